"""Train the text-to-image DiT.

Examples:
  python train.py -c configs/e2e-vae/toy.yaml                       # one process (CPU or one GPU)
  torchrun --nproc_per_node 8 train.py -c CONFIG --deepspeed-config-path configs/deepspeed/zero2.json
  srun torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d ... train.py -c CONFIG
  python train.py -c CONFIG trainer.max_steps=1000 data.batch_size_per_gpu=16   # key=value overrides
  python train.py -c CONFIG --dry-run --world-size 32   # plan: params, FLOPs, memory per GPU; no GPU

The YAML is merged onto the typed schema in fusedit/config.py, overrides on top; the whole
config is validated (and data paths checked) before any process group, model or data is
created. A run resumes from its newest complete checkpoint unless trainer.resume_from=null;
trainer.init_from={checkpoint: RUN_DIR, tag: latest|STEP, weights: ema|raw} starts a new run from
another run's weights (the 512 px stage: configs/e2e-vae/sa-w2048-3b-res512-*-200k.yaml).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusedit.config import TrainConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from common.argtypes import DashedArgumentParser

    parser = DashedArgumentParser(  # also reads the old spellings (--deepspeed_config_path)
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", required=True, help="training YAML (see configs/e2e-vae/)")
    parser.add_argument(
        "--deepspeed-config-path",
        default=None,
        help="DeepSpeed JSON; 'auto' fields are filled from the YAML (default: built-in ZeRO-2)",
    )
    plan = parser.add_argument_group("dry run (fusedit/tools/plan.py): plan without GPUs, weights, data or processes")
    plan.add_argument(
        "--dry-run",
        action="store_true",
        help="build the DiT on the meta device, print parameters, FLOPs/step and memory/GPU, write "
        "<checkpoint_dir>/plan.json and config.resolved.yaml, then exit",
    )
    plan.add_argument("--world-size", type=int, default=8, help="GPUs to plan for (default: %(default)s)")
    plan.add_argument(
        "--zero-stage",
        type=int,
        choices=(1, 2),
        default=None,
        help="ZeRO stage to highlight (default: the DeepSpeed JSON's, else 2)",
    )
    plan.add_argument(
        "--text-tokens", type=int, default=None, help="text tokens per prompt (default: data.max_prompt_length)"
    )
    parser.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # torch.distributed.launch
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from common.config import ConfigError
    from common.lifecycle import error_exit
    from fusedit.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return error_exit(str(err))
    if args.dry_run:
        return dry_run(args, cfg)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    from common.distributed import cleanup
    from common.lifecycle import run_entry
    from fusedit.train.trainer import Trainer

    def body() -> None:
        last = Trainer(cfg, deepspeed_config_path=args.deepspeed_config_path).train()
        if rank == 0 and last:
            print("final: " + " ".join(f"{k}={v:.6g}" for k, v in last.items() if isinstance(v, (int, float))))

    return run_entry(body, cleanup)


def dry_run(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Plan the run and exit; imports neither DeepSpeed nor the trainer, starts no process group."""
    from common.config import ConfigError
    from fusedit.tools.plan import run_dry_run

    if args.text_tokens is not None and args.text_tokens < 1:
        print(f"error: --text-tokens: must be >= 1, got {args.text_tokens}", file=sys.stderr)
        return 2
    try:
        run_dry_run(
            cfg,
            config_path=args.config,
            world_size=args.world_size,
            zero_stage=args.zero_stage,
            text_tokens=args.text_tokens,
            deepspeed_config_path=args.deepspeed_config_path,
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
