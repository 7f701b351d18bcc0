"""ldm-train as a file to run, for launchers that start `python FILE` and cannot pass `-m` (DeepSpeed's srun)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("ldm.cli.train", run_name="__main__", alter_sys=True)
