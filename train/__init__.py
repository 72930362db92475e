"""Fine-tuning: LoRA on Ray Train + DeepSpeed ZeRO, exported as versioned adapters for serving.

* :mod:`train.config` — ``TrainConfig`` (YAML + ``--set`` overrides), validated before any worker.
* :mod:`train.data` — JSONL (chat, prompt/completion, alpaca) → masked token sequences.
* :mod:`train.recipe` — the per-worker loop, one linear file.
* :mod:`train.launch` — the ``TorchTrainer`` wiring, resume, and the driver-side export.
* :mod:`train.export` — PEFT adapter saving (ZeRO-3 aware) and registration in the adapter store.
* :mod:`train.cli` — ``ragtune train`` (local run, Ray Jobs submit/status/logs/stop).
* :mod:`train.bench` — throughput of the recipe vs a plain single-process PEFT loop.
"""
