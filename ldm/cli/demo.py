"""ldm-demo: the whole pipeline on the embedded emoji default, sized for a 2-core CPU.

emoji shards (npm) -> stage-1 autoencoder (held-out PSNR / SSIM / colour error / rFID) -> text-conditioned LDM under
DeepSpeed (held-out loss, CFG sample grid, the evaluation protocol at the end) -> export, everything logged to the
local MLflow store runs/mlflow.db. Finished stages are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ldm.cli._common import run_main
from ldm.config import AutoencoderConfig, LDMConfig, load_config

STAGE1_RESULT = "stage1.json"  # beside the autoencoder folder: its held-out numbers, printed again on a re-run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ldm-demo", description=__doc__)
    p.add_argument("--data", default="data/emoji", help="shard folder (default: data/emoji)")
    p.add_argument("--autoencoder-config", default="configs/autoencoder/emoji.yaml")
    p.add_argument("--ldm-config", default="configs/ldm/emoji.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for the LDM config")
    return run_main(demo, p.parse_args(argv))


def demo(args: argparse.Namespace) -> int:
    """Shards, stage 1, the LDM (each skipped when finished), then what it reached and where to look."""
    from ldm.data.shards import build_emoji_shards
    from ldm.eval import summary as eval_summary
    from ldm.train import Trainer
    from ldm.train.autoencoder import summary as stage1_summary
    from ldm.train.autoencoder import train_stage1

    t0 = time.time()
    times: dict[str, float] = {}  # minutes per stage, printed at the end
    ae_cfg = load_config(AutoencoderConfig, args.autoencoder_config, [f"data.train={args.data}",
                                                                      f"data.val={args.data}"])
    ldm_cfg = load_config(LDMConfig, args.ldm_config, [f"data.train={args.data}", f"data.val={args.data}",
                                                       f"autoencoder.path={ae_cfg.run.output_dir}",
                                                       *args.overrides])
    if not (Path(args.data) / "index.json").exists():
        print(f"[1/3] building emoji shards in {args.data}")
        build_emoji_shards(args.data, image_size=ae_cfg.data.image_size)
    else:
        print(f"[1/3] shards present in {args.data}")
    times["shards"] = (time.time() - t0) / 60
    t1 = time.time()
    ae_dir = Path(ae_cfg.run.output_dir)
    record = ae_dir.parent / f"{ae_dir.name}.{STAGE1_RESULT}"
    if not (ae_dir / "config.json").exists():
        print(f"[2/3] training the stage-1 autoencoder -> {ae_dir}")
        stage1 = train_stage1(ae_cfg)
        record.write_text(json.dumps(stage1, indent=2))
    else:
        print(f"[2/3] autoencoder present in {ae_dir}")
        stage1 = json.loads(record.read_text()) if record.is_file() else None
    if stage1 is not None:
        print(f"      stage 1: {stage1_summary(stage1)}")
        print(f"      reconstructions (held-out above, decoded below): {Path(stage1['grid']).resolve()}")
    times["stage 1"] = (time.time() - t1) / 60
    t2 = time.time()
    print(f"[3/3] training the text-conditioned LDM under DeepSpeed -> {ldm_cfg.run.output_dir}")
    trainer = Trainer(ldm_cfg)
    result = trainer.train()
    if result["preempted"]:
        print(f"stopped by a signal at step {result['step']}; run the same command again to resume")
        return 0
    times["LDM (training, grid, evaluation, export)"] = (time.time() - t2) / 60
    print("")
    print(f"done in {(time.time() - t0) / 60:.1f} min: "
          + ", ".join(f"{stage} {minutes:.1f} min" for stage, minutes in times.items()))
    if stage1 is not None:
        print(f"stage 1: {stage1_summary(stage1)}")
    if result["first_loss"] is not None:
        print(f"LDM loss: {result['first_loss']:.4f} at step 1 -> {result['last_loss']:.4f} at the end")
    if result["val"]:
        print(f"held-out loss (eps-MSE over {ldm_cfg.train.val_bands} timestep bands): {result['val']['val/loss']:.4f}")
    if result["eval"]:
        print(f"evaluation: {eval_summary(result['eval'])}")
    print(f"sample grid ({', '.join(ldm_cfg.sampling.prompts)}; guidance {ldm_cfg.sampling.guidance}): "
          f"{Path(result['grid']).resolve()}")
    print(f"exported model: {result['export']}  (sample more: ldm-sample --model {result['export']} "
          f"--prompt 'red heart')")
    print(f"MLflow: {trainer.tracker.ui_hint()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
