"""ISNetTrainer under DDP: 2 CPU processes (gloo, torchrun) train exactly as 1 process on the same global batch.

The heatmap loss back-propagates through an input gradient (``autograd.grad(create_graph=True)``) before the
normal backward; DDP must still all-reduce every parameter gradient once per step. The relevance-range
calibration (a nested Trainer, then per-rank measuring passes merged across ranks) must give the ranges of
one process too.

For exact equivalence the model has no BatchNorm (DDP uses per-rank batch statistics), rows hold tensors
(no random augmentation) and the data set is exactly one global batch (each step sees all of it, whatever
the shuffle); SGD without a learning-rate schedule makes a wrong gradient visible in the parameters.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import datasets, torch
    from torch import nn
    from hf_isnet.modeling import create_model
    from hf_isnet.trainer import ISNetTrainer
    from hf_isnet.training_args import ISNetTrainingArguments

    out, per_device_batch = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 16, 16, generator=g)
    masks = torch.zeros(4, 1, 16, 16)
    masks[:, :, 4:12, 3:11] = 1
    ds = datasets.Dataset.from_dict(
        {"pixel_values": pixels.numpy(), "masks": masks.numpy(), "label": [0, 1, 2, 1]}
    ).with_format("torch")

    result = {}
    for variant, relevance_range in (("selective", "auto"), ("dual", "1,10")):
        torch.manual_seed(0)
        model = create_model("resnet18", labels=["a", "b", "c"], input_size=16, norm_layer=nn.Identity)
        args = ISNetTrainingArguments(
            output_dir=os.path.join(out, variant), variant=variant, relevance_range=relevance_range,
            calibration_epochs=1, use_cpu=True, report_to="none", save_strategy="no",
            dataloader_num_workers=0, per_device_train_batch_size=per_device_batch, max_steps=2,
            optim="sgd", learning_rate=0.05, lr_scheduler_type="constant", logging_steps=1,
            disable_tqdm=True, seed=0,
            background_attenuation=False,  # random per-rank dimming would differ from one process's draws
        )
        trainer = ISNetTrainer(model=model, args=args, train_dataset=ds)
        trainer.train()
        torch.save(model.state_dict(), os.path.join(out, f"{variant}-rank{rank}.pt"))
        result[variant] = {
            "world_size": trainer.accelerator.num_processes,
            "ranges": trainer.calibration.ranges() if trainer.calibration is not None else None,
            "logs": [e for e in trainer.state.log_history if "loss" in e],
        }
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(commands, cwd):
    """Run the commands concurrently (one process and the 2-rank group at once); all must succeed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    try:
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for command, proc, output in zip(commands, procs, outputs):
        assert proc.returncode == 0, f"{command} failed:\n{output[-8000:]}"


def test_two_cpu_processes_train_like_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    _run_all([
        [sys.executable, str(script), str(single), "4"],
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(script), str(ddp), "2"],
    ], tmp_path)

    one = json.loads((single / "result.json").read_text())
    two = json.loads((ddp / "result.json").read_text())
    for variant in ("selective", "dual"):
        assert one[variant]["world_size"] == 1 and two[variant]["world_size"] == 2
        reference = torch.load(single / f"{variant}-rank0.pt")
        initial = _initial_weights()
        assert max(float((reference[k] - initial[k]).abs().max()) for k in reference) > 1e-3  # it trained
        for rank in (0, 1):
            replica = torch.load(ddp / f"{variant}-rank{rank}.pt")
            diff = max(float((replica[k] - reference[k]).abs().max()) for k in reference)
            assert diff < 1e-5, f"{variant} rank {rank}: max |param diff| {diff:.2e} vs one process"
        # the logged losses are those of the global batch (reduced over ranks)
        for a, b in zip(one[variant]["logs"], two[variant]["logs"], strict=True):
            for key in ("loss", "classification_loss", "heatmap_loss", "background_fraction"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (variant, key, a, b)
    # the calibration merges every rank's measurements: the ranges of one process over the same images
    ranges_one, ranges_two = one["selective"]["ranges"], two["selective"]["ranges"]
    assert ranges_one is not None and set(ranges_one) == set(ranges_two) == {"input"}
    assert ranges_two["input"] == pytest.approx(ranges_one["input"], rel=1e-4)
    assert (ddp / "selective" / "isnet_calibration.json").is_file()


def _initial_weights():
    from torch import nn

    from hf_isnet.modeling import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", labels=["a", "b", "c"], input_size=16, norm_layer=nn.Identity)
    return model.state_dict()
