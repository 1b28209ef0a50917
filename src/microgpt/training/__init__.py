"""Training: the LightningModule, the run that builds and fits it, strategies and metrics.

train.py       run(cfg): a composed Hydra config -> a Lightning run (the root train.py calls it)
lit.py         LitGPT, the LightningModule plugins extend through its contract methods
strategies.py  DDP / FSDP / DeepSpeed factories and what each strategy implies (sharding, resume)
rendezvous.py  bounds the processes' meeting (process-group init) by init_timeout_s: one error line, no hang
metrics.py     loss, perplexity and bits per byte as a torchmetrics Metric
precision.py   trainer.precision=auto: bf16-mixed where the hardware has bf16 arithmetic, else 32-true
"""
