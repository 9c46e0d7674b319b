"""Run under torchrun by tests/test_parallel_launch.py: several engines, one after the other, in one world (one
launch instead of one per layout). jobs.json lists {name, config, greedy (default true)}; every rank builds each
engine; rank 0 computes the teacher-forced logits and, unless greedy is false, a greedy generation and saves them,
every rank records the checkpoint bytes it read;
the other ranks run the steps rank 0 sends, as under `moerun <command>`. The script joins the world itself, so the
engines find it joined and share it (each `moerun` command leaves the world it joined when it ends)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from moerun.runtime.engine import Engine
from moerun.runtime.launch import launch_env
from moerun.runtime.sampling_params import SamplingParams


def main(out: Path) -> None:
    spec = json.loads((out / "jobs.json").read_text())
    rank = launch_env().rank
    dist.init_process_group("gloo")
    for job in spec["jobs"]:
        engine = Engine.from_config(job["config"])
        (out / f"{job['name']}.bytes{rank}").write_text(str(engine.bytes_read))
        if engine.comm.is_first:
            saved = {"logits": engine.logits(spec["token_ids"]).numpy()}
            if job.get("greedy", True):
                outputs = engine.generate(spec["prompts"], SamplingParams(
                    temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True))
                saved["greedy"] = np.array([o.output_token_ids for o in outputs])
            np.savez(out / f"{job['name']}.npz", **saved)
        else:
            engine.run_worker()
        engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
