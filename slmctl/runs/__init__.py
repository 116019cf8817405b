"""Run directories: where every stage writes, and how stages find each other's output.

`run.py`: a run's life (create, write, seal, fail, resume); `lookup.py`: finding runs and reading
them (latest, references, listings, status, metrics, manifests).

No stage hands anything to the next in memory. Each writes a run directory

    <runs_dir>/<stage>/<YYYYmmdd-HHMMSS UTC>-<name>/
      config.yaml  command.txt  env.json  status.json  metrics.jsonl  log.txt
      inputs.json  checkpoints/  model/  MANIFEST.json

and the next stage is pointed at that directory, at `<runs_dir>/<stage>/latest`, or at
the model directory inside it. So every result can be traced to the config, code,
machine and inputs that produced it, and checked against its manifest.

Every file except the two append-only logs (log.txt, metrics.jsonl) is written to a
temporary name and renamed, so a killed process never leaves a half-written file that
looks whole. A run is "running" until it ends "succeeded", "failed" or "interrupted".
Succeeded and failed runs are sealed: nothing writes to them again, and `Run.create`
never reuses a directory. An interrupted run (or one whose process was killed, which
still says "running") can be reopened with `Run.open(path).resume()` and continued.
"""
