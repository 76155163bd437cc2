"""Training and evaluation of FAM adapters (not needed by the server: install with the `[train]` extra).

    python -m training.finetune --run runs/fam        # train an adapter (resumable)
    python -m training.export_adapter runs/fam/ckpt.pt model/adapters/<name>.safetensors
    python -m training.evaluate passkey ...           # PassKey and next-token evaluation
    python -m training.bench_step                     # where a training step's time goes

`train` holds the loss over a sequence (BPTT through blocks, RSP, RPO, distillation), `data` the data mixture,
`tiny` the from-scratch PassKey experiment; the rest are entry points.
"""
