"""The "fuse-dit-clip" type end to end (issue 27): a FuseDiT modulated by a CLIP text encoder's pooled embedding.

A tiny CLIP text model with projection and a byte-level BPE tokenizer are built here (saved with
``save_pretrained``, loaded through ``from_pretrained`` like SD3's CLIP-L), once as a plain folder
and once in SD3's layout (``text_encoder/`` + ``tokenizer/``, what the samplers' ``--clip-l`` reads).
The toy world is not touched. Then: the pooled embedding is the reference's (projected EOS state,
77 tokens); the sampler's cached path with pooled text equals the uncached model, CFG's
unconditional rows included; train.py trains a FuseDiT+CLIP on the quick world (the pooled text
reaches ``condition_embedder``), a benchmark sampler samples it with ``--type fuse-dit-clip`` (and
``--clip-l``), its export loads in plain diffusers; and the mistakes are one error line each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, in_parallel, launch, tiny_fuse_overrides

CONFIG = ROOT / "configs" / "e2e-vae" / "toy-fusedit.yaml"
CLIP_WIDTH = 16  # the toy CLIP's projection: model.text_modulation_embeds_dim
PROMPTS = ["a red circle on the left", "a blue square"]


def build_toy_clip(folder: Path, tokenizer_folder: Path | None = None, seed: int = 0) -> None:
    """A 2-layer CLIPTextModelWithProjection saved in ``folder``, its CLIPTokenizer in ``tokenizer_folder``
    (default: the same folder).

    The tokenizer is a real byte-level BPE (CLIP's normaliser, pre-tokeniser and ``</w>`` word
    ends) whose vocabulary is the 256 byte symbols with and without ``</w>`` and no merges: every
    caption tokenises, one symbol per character. BOS/EOS come last, as in CLIP's vocabulary, and
    the model's config names their ids (EOS is where the pooled state is read).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=CLIP_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    tokenizer.save_pretrained(tokenizer_folder or folder)


@pytest.fixture(scope="module")
def toy_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/clip`` (model and tokenizer in one folder) and ``<root>/sd3`` (SD3's subfolders), same weights."""
    root = tmp_path_factory.mktemp("clip")
    build_toy_clip(root / "clip")
    build_toy_clip(root / "sd3" / "text_encoder", root / "sd3" / "tokenizer")
    return root


def clip_overrides(clip: Path, **extra: object) -> dict[str, object]:
    """What turns the toy FuseDiT config into the fuse-dit-clip type."""
    return {
        "model.encoder_type": "clip-llm",
        "model.text_modulation_embeds_dim": CLIP_WIDTH,
        "model.clip_text_encoder": str(clip),
        **extra,
    }


# ------------------------------------------------------------------------------- the encoder
def test_the_pooled_embedding_is_the_projected_eos_state(toy_clip: Path) -> None:
    from transformers import CLIPTextModel

    from fusedit.text import CLIP_MAX_LENGTH, ClipSource, ClipTextEncoder

    clip = ClipTextEncoder.load(ClipSource.from_path(str(toy_clip / "clip")))
    ids = clip.tokenize([*PROMPTS, ""])
    eos, bos = clip.tokenizer.eos_token_id, clip.tokenizer.bos_token_id
    assert ids.shape == (3, CLIP_MAX_LENGTH) and (ids[:, 0] == bos).all()
    assert ids[2, 1] == eos and ids[0, len(PROMPTS[0]) + 1] == eos  # one symbol per character, then EOS
    pooled = clip.embed([*PROMPTS, ""])
    model = clip.model
    hidden = model.text_model(input_ids=ids).last_hidden_state
    ends = (ids == eos).int().argmax(-1)
    expected = model.text_projection(hidden[torch.arange(3), ends])
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    # causal attention: the padding after EOS does not change the pooled state
    short = clip.encode(ids[:1, : len(PROMPTS[0]) + 2])
    torch.testing.assert_close(short, pooled[:1], rtol=1e-5, atol=1e-6)
    # SD3's layout (--clip-l of the reference) loads the same model and tokenizer
    sd3 = ClipTextEncoder.load(ClipSource.from_path(str(toy_clip / "sd3")))
    torch.testing.assert_close(sd3.embed(PROMPTS), pooled[:2], rtol=0, atol=0)
    # a CLIP text model without its projection is refused rather than given a random one
    CLIPTextModel(model.config).save_pretrained(toy_clip / "bare")
    with pytest.raises(OSError, match="text_projection"):
        ClipTextEncoder.load(ClipSource(str(toy_clip / "bare"), tokenizer=str(toy_clip / "clip")))


# --------------------------------------------------------------- the sampler's text cache
def test_cached_sampling_with_pooled_text_equals_the_uncached_model(quick_world: Path, toy_clip: Path) -> None:
    """DiTPipeline (text cache: LLM and CLIP once per batch) against the model run in full at every
    step; the unconditional CFG rows take CLIP's embedding of "" (as training's dropped captions)."""
    from common.vae_config import VaeSpec
    from fusedit.flow import euler_sample, sampling_sigmas
    from fusedit.latents import LatentCodec
    from fusedit.models.fuse_dit import FuseDiT
    from fusedit.pipeline import DiTPipeline
    from fusedit.text import ClipSource, ClipTextEncoder, TextEncoder, tokenize

    text_encoder = TextEncoder(str(quick_world / "text_encoder"))
    codec = LatentCodec.from_spec(VaeSpec(str(quick_world / "vae")))
    torch.manual_seed(0)
    c = codec.latent_channels
    model = FuseDiT.from_llm(
        text_encoder.model,
        in_channels=c,
        out_channels=c,
        num_layers=3,
        hidden_size=32,
        text_modulation_embeds_dim=CLIP_WIDTH,
    )
    with torch.no_grad():  # away from adaLN-zero's zero start, or the output ignores the conditioning
        for p in model.dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    clip = ClipTextEncoder.load(ClipSource.from_path(str(toy_clip / "clip")))
    pipe = DiTPipeline(model, text_encoder, codec, _scheduler(), max_prompt_length=32, clip=clip)
    kw = dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.0, seed=7)
    cached = pipe(PROMPTS, **kw)

    texts = [""] * len(PROMPTS) + PROMPTS
    ids, mask = tokenize(text_encoder.tokenizer, texts, 32)
    pooled = clip.embed(texts)
    noise = pipe.initial_noise([(p, i, 0) for i, p in enumerate(PROMPTS)], 32, 32, 7)
    with torch.no_grad():
        latents = euler_sample(
            lambda x, t: model(x, t, ids, mask, pooled_text=pooled), noise, sampling_sigmas(pipe.scheduler, 3), 3.0
        )
        uncached = ((codec.decode(latents).float() + 1.0) / 2.0).clamp(0.0, 1.0)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-5)
    # and the pooled text matters: the conditional rows' CLIP embedding of "" gives other images
    with torch.no_grad():
        blind = euler_sample(
            lambda x, t: model(x, t, ids, mask, pooled_text=clip.embed([""] * len(texts))),
            noise,
            sampling_sigmas(pipe.scheduler, 3),
            3.0,
        )
    assert (codec.decode(blind) - codec.decode(latents)).abs().max() > 1e-3


def _scheduler():
    from fusedit.config import NoiseSchedulerConfig, TrainConfig
    from fusedit.flow import build_scheduler

    return build_scheduler(TrainConfig(noise_scheduler=NoiseSchedulerConfig()))


# -------------------------------------------------------------------------------- refusals
def test_a_pooled_width_other_than_clips_is_refused_by_name(quick_world: Path, toy_clip: Path) -> None:
    from common.config import ConfigError
    from fusedit.config import load_config
    from fusedit.train.trainer import load_clip

    clip = clip_overrides(toy_clip / "clip", **{"model.text_modulation_embeds_dim": 8})
    cfg = load_config(CONFIG, tiny_fuse_overrides(quick_world, quick_world / "unused", **clip))
    with pytest.raises(ConfigError, match=r"^model\.text_modulation_embeds_dim: 8, but the CLIP text encoder .* 16"):
        load_clip(cfg, torch.float32, torch.device("cpu"))


def test_the_sampler_names_the_family_a_model_is() -> None:
    from types import SimpleNamespace

    from transformers import GemmaConfig

    from evaluation import sampling
    from fusedit.models.fuse_dit import FuseDiT

    sizes = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    llm = GemmaConfig(**sizes, num_key_value_heads=1, head_dim=8).to_dict()
    plain = FuseDiT(llm_config=llm, num_layers=1, hidden_size=16, in_channels=4, out_channels=4)
    held = r"^--type fuse-dit-clip, but the checkpoint holds a fuse-dit model"
    with pytest.raises(sampling.SamplingError, match=held):
        sampling.check_type("fuse-dit-clip", SimpleNamespace(transformer=plain))


# ------------------------------------------------------------------- training to sampling
@pytest.mark.e2e
def test_fuse_dit_clip_trains_samples_and_exports(quick_world: Path, toy_clip: Path, tmp_path: Path, capsys) -> None:
    """train.py, 4 steps (checkpoint and preview grid at 4) with a frozen LLM and no weight decay, so
    that every change of ``condition_embedder`` comes from a gradient through the pooled CLIP text.
    Under adaLN-zero that gradient needs the output head (step 1) and the modulations (step 2) to
    have left zero first, hence a constant learning rate. Beside it, the same config without
    model.text_modulation_embeds_dim is one error line."""
    from evaluation import sampling
    from fusedit.config import load_config
    from fusedit.flops import TrainingFlops, clip_text_arch, clip_text_forward_flops
    from tests.test_fuse_dit_training import check_export

    run = tmp_path / "run"
    extra = {"trainer.max_steps": 4, "trainer.checkpointing_steps": 4, "trainer.sampling_steps": 4}
    extra |= {"sample.num_steps": 2, "trainer.train_llm": "false", "optimizer.weight_decay": 0}
    extra |= {"lr_scheduler.name": "constant", "lr_scheduler.num_warmup_steps": 0}
    train = [str(ROOT / "train.py"), "-c", str(CONFIG)]
    good = tiny_fuse_overrides(quick_world, run, **clip_overrides(toy_clip / "clip", **extra))
    bad = tiny_fuse_overrides(quick_world, tmp_path / "bad", **clip_overrides(toy_clip / "clip"))
    bad.append("model.text_modulation_embeds_dim=null")
    _, refused = in_parallel(lambda: launch([*train, *good]), lambda: launch([*train, *bad], check=False))
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and len(errors) == 1, refused.stderr
    assert "error: model.text_modulation_embeds_dim: required with model.clip_text_encoder" in errors[0]
    assert (run / "samples" / "00000004.png").is_file()

    raw, ema = (load_file(str(run / "4" / k / "diffusion_pytorch_model.safetensors")) for k in ("model", "ema"))
    for name in ("dit.condition_embedder.1.weight", "dit.condition_embedder.3.weight"):
        assert (raw[name] - ema[name]).abs().max() > 1e-5, name  # moved: the EMA lags behind
    config = json.loads((run / "4" / "model" / "config.json").read_text())
    assert config["text_modulation_embeds_dim"] == CLIP_WIDTH
    # the log's model FLOPs count the CLIP text forward (77 tokens) once per sample
    from transformers import CLIPTextConfig

    from fusedit.tools.plan import describe_vae, vae_encoder_forward_flops

    cfg = load_config(str(run / "config.yaml"), [])
    assert (cfg.model.clip_text_encoder, cfg.model.encoder_type) == (str(toy_clip / "clip"), "clip-llm")
    clip_flops = clip_text_forward_flops(clip_text_arch(CLIPTextConfig.from_pretrained(toy_clip / "clip")), 77)
    vae = vae_encoder_forward_flops(describe_vae(cfg), cfg.data.resolution)
    image_tokens = (config["sample_size"] // config["patch_size"]) ** 2
    flops = TrainingFlops({**config, "train_llm": False}, image_tokens, None, vae, clip_flops)
    for row in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        per_image = row["perf/model_tflop_per_s_per_gpu"] * 1e12 / row["perf/images_per_s"]
        assert any(per_image == pytest.approx(flops.per_sample(n), rel=1e-6) for n in (8, 16, 24, 32)), row

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    base = ["--checkpoint", str(run), "--prompts", str(prompts), "--num-inference-steps", "2", "--resolution", "32"]
    assert sampling.main("coco", [*base, "--type", "fuse-dit-clip", "--save-dir", str(tmp_path / "coco")]) == 0
    sd3 = ["--type", "fuse-dit-clip", "--clip-l", str(toy_clip / "sd3"), "--save-dir", str(tmp_path / "sd3")]
    assert sampling.main("coco", [*base, *sd3]) == 0
    for name in ("00000.png", "00001.png"):  # the same CLIP weights through the reference's layout
        assert (tmp_path / "coco" / name).read_bytes() == (tmp_path / "sd3" / name).read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        sampling.main("coco", [*base, "--type", "fuse-dit", "--save-dir", str(tmp_path / "x")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (and loading bars)
    assert err.value.code == 2 and len(lines) == 1 and "holds a fuse-dit-clip model" in lines[0], lines
    check_export(run, tmp_path)  # plain diffusers loads the CLIP text encoder and tokenizer too
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index["clip_text_encoder"] == ["transformers", "CLIPTextModelWithProjection"], index
