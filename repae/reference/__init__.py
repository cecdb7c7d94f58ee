"""Interoperability with the reference REPA-E code: CompVis VAE layout, converters, experiment importer."""
