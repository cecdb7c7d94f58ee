"""Tools around the text-to-image library: plan (dry run), bench, sweep, demo."""
