"""ldm-demo: the whole pipeline on the embedded emoji default, sized for a 2-core CPU.

emoji shards (npm) -> stage-1 autoencoder -> text-conditioned LDM under DeepSpeed -> CFG sample grid,
everything logged to the local MLflow store runs/mlflow.db. Finished stages are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ldm.cli._common import run_main
from ldm.config import AutoencoderConfig, LDMConfig, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ldm-demo", description=__doc__)
    p.add_argument("--data", default="data/emoji", help="shard folder (default: data/emoji)")
    p.add_argument("--autoencoder-config", default="configs/autoencoder/emoji.yaml")
    p.add_argument("--ldm-config", default="configs/ldm/emoji.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for the LDM config")
    args = p.parse_args(argv)

    def body() -> int:
        from ldm.cli.train_autoencoder import train as train_autoencoder
        from ldm.data.shards import build_emoji_shards
        from ldm.train import Trainer

        t0 = time.time()
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
        if not (Path(ae_cfg.run.output_dir) / "config.json").exists():
            print(f"[2/3] training the stage-1 autoencoder -> {ae_cfg.run.output_dir}")
            ae = train_autoencoder(ae_cfg)
            print(f"      scale factor {ae['scale_factor']:.4f}, val L1 {ae['val_l1']:.4f}, "
                  f"reconstructions {ae['grid']}")
        else:
            print(f"[2/3] autoencoder present in {ae_cfg.run.output_dir}")
        print(f"[3/3] training the text-conditioned LDM under DeepSpeed -> {ldm_cfg.run.output_dir}")
        trainer = Trainer(ldm_cfg)
        result = trainer.train()
        if result["preempted"]:
            print(f"stopped by a signal at step {result['step']}; run the same command again to resume")
            return 0
        minutes = (time.time() - t0) / 60
        print("")
        print(f"done in {minutes:.1f} min")
        if result["first_loss"] is not None:
            print(f"LDM loss: {result['first_loss']:.4f} at step 1 -> {result['last_loss']:.4f} at the end")
        print(f"sample grid ({', '.join(ldm_cfg.sampling.prompts)}; guidance {ldm_cfg.sampling.guidance}): "
              f"{Path(result['grid']).resolve()}")
        print(f"exported model: {result['export']}  (sample more: ldm-sample --model {result['export']} "
              f"--prompt 'red apple')")
        print(f"MLflow: {trainer.tracker.ui_hint()}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
