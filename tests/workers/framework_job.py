"""Trains with a real framework (Lightning, transformers, Accelerate) on 2 gloo ranks through ckptd's
integration, three times: uninterrupted, killed (every rank SIGKILLs itself right after a save was
handed over), and resumed from the newest committed checkpoint (the first two side by side).
tests/test_integrations.py runs it.

    python tests/workers/framework_job.py FRAMEWORK WORKDIR

The framework is imported once here; each run's ranks are forked from this process (with the
environment torchrun would give them), so a run costs no framework import. Each rank of each run
writes WORKDIR/<run>.rank<R> (torch.save): {"losses": {step: loss}, "states": {step: model state
at that step}, "final": final model and optimizer state}. WORKDIR/version_error.txt holds the
integration's error for a framework version outside its supported range.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

WORLD = 2
STEPS = 20
SAVE_EVERY = {"lightning": 4, "lightning-sharded": 4, "transformers": 3, "accelerate": 3}
CRASH_AT = {"lightning": 8, "lightning-sharded": 8, "transformers": 9, "accelerate": 9}
"""A save step: its save is handed over, then every rank dies. 8 steps make an epoch: Lightning's crash
falls at an epoch's end, since its mid-epoch resume replays other batches even from its own checkpoints
(a StatefulDataLoader under DDP; seen with TorchCheckpointIO too); the others' falls mid-epoch."""
FRAMEWORK = "lightning"  # set by main()
RUNS = ("reference", "crash", "resume")


class Record:
    """What one rank of one run writes: the loss, the sum of the inputs and the model state after each
    step, and its final model and optimizer state."""

    def __init__(self, workdir: Path, run: str, rank: int) -> None:
        self.path = workdir / f"{run}.rank{rank}"
        self.losses: Dict[int, float] = {}
        self.batches: Dict[int, float] = {}
        self.states: Dict[int, Dict[str, torch.Tensor]] = {}
        self.final: Dict[str, Any] = {}

    def step(self, step: int, loss: float, model: Optional[nn.Module], inputs: torch.Tensor) -> None:
        """Record a step's loss and inputs, and the model after its update (unless given later)."""
        self.losses[step] = loss
        self.batches[step] = float(inputs.double().sum())
        if model is not None:
            self.model_after(step, model)

    def model_after(self, step: int, model: nn.Module) -> None:
        self.states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def write(self) -> None:
        torch.save(
            {"losses": self.losses, "batches": self.batches, "states": self.states, "final": self.final}, self.path
        )


def version_error(package: Any, too_old: str, construct: Callable[[], Any]) -> str:
    """What `construct()` raises (type and words, for the test) while `package` claims `too_old`."""
    real, package.__version__ = package.__version__, too_old
    try:
        construct()
    except Exception as exc:  # the test checks the type and the words
        return f"{type(exc).__name__}: {exc}"
    finally:
        package.__version__ = real
    return "no error"


def job_dir(workdir: Path, run: str) -> Path:
    """Where a run keeps its checkpoints: the crashed run and its resumption share one."""
    return workdir / ("reference" if run == "reference" else "job")


def crash(record: Record) -> None:
    """Write what this rank did, then SIGKILL this process (the save just handed over stays with the daemon)."""
    record.write()
    os.kill(os.getpid(), signal.SIGKILL)


def data(samples: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(samples, 8, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).tanh())


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


# --- Lightning -------------------------------------------------------------------------------------


def lightning_module(record: Record, run: str, sharded: bool) -> Any:
    """The LightningModule class both Lightning tests train; `sharded`: FSDP2 in configure_model, and
    the states recorded gathered whole."""
    import lightning as L
    from torch.distributed.fsdp import fully_shard

    class Regression(L.LightningModule):
        def __init__(self, lr: float = 0.05, note: Any = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = make_model()

        def configure_model(self) -> None:
            if not sharded:
                return
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, sync_dist=sharded)
            return loss

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            record.step(self.global_step, float(outputs["loss"]), None if sharded else self.net, batch[0])
            if sharded:
                record.states[self.global_step] = full_tensors(self.net.state_dict())
            if run == "crash" and self.global_step == CRASH_AT[FRAMEWORK]:  # ModelCheckpoint's hook has saved by now
                crash(record)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)]

    return Regression


def lightning_trainer(workdir: Path, run: str, devices: int, **settings: Any) -> Any:
    """A quiet CPU Trainer for `run`; `settings` add the strategy, callbacks and plugins."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=job_dir(workdir, run),
        **settings,
    )


def model_checkpoint(workdir: Path, run: str) -> Any:
    """The ModelCheckpoint of both Lightning tests: every SAVE_EVERY steps, the 2 best by train_loss, and last."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(
        dirpath=job_dir(workdir, run) / "lightning",
        every_n_train_steps=SAVE_EVERY[FRAMEWORK],
        monitor="train_loss",
        save_top_k=2,
        save_last=True,
    )


def lightning_run(workdir: Path, run: str, rank: int) -> None:
    """DDP with CkptdCheckpointIO: rank 0's checkpoint dict saved as a one-rank ckptd job."""
    from ckptd.client.integrations.lightning import CkptdCheckpointIO, retention_for

    record = Record(workdir, run, rank)
    checkpoints = model_checkpoint(workdir, run)
    trainer = lightning_trainer(
        workdir,
        run,
        WORLD,
        strategy="ddp",
        callbacks=[checkpoints],
        plugins=[CkptdCheckpointIO(str(job_dir(workdir, run) / "ckpt"), retention=retention_for(checkpoints))],
    )
    model = lightning_module(record, run, sharded=False)(note=Path("/not/a/supported/value"))  # kept as its repr
    loader = torch.utils.data.DataLoader(data(), batch_size=4)  # Lightning adds a DistributedSampler
    trainer.fit(model, loader, ckpt_path="last" if run == "resume" else None)
    record.final = {"model": model.net.state_dict(), "optimizer": trainer.optimizers[0].state_dict()}
    record.write()


def full_tensors(state: Any) -> Any:
    """`state` with every DTensor gathered into a plain tensor (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        return {key: full_tensors(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full_tensors(value) for value in state)
    return state


def lightning_sharded_run(workdir: Path, run: str, rank: int) -> None:
    """FSDP2 (`fully_shard` in configure_model) under CkptdModelParallelStrategy: the model and the
    optimizer are SHARDED DTensors, each rank saving its own half. The run "reshard" is one rank that
    loads the resumed job's last checkpoint and trains no further."""
    from ckptd.client.integrations.lightning import retention_for
    from ckptd.client.integrations.lightning_sharded import CkptdModelParallelStrategy

    record = Record(workdir, run, rank)
    checkpoints = model_checkpoint(workdir, run)
    resharding = run == "reshard"
    world = 1 if resharding else WORLD
    strategy = CkptdModelParallelStrategy(
        str(job_dir(workdir, run) / "ckpt"),
        data_parallel_size=world,
        tensor_parallel_size=1,
        retention=retention_for(checkpoints),
    )
    trainer = lightning_trainer(
        workdir,
        run,
        world,
        strategy=strategy,
        callbacks=[] if resharding else [checkpoints],
        enable_checkpointing=not resharding,
    )
    model = lightning_module(record, run, sharded=True)()
    loader = torch.utils.data.DataLoader(data(), batch_size=4)  # Lightning adds a DistributedSampler
    resume_from = {"resume": "last", "reshard": str(job_dir(workdir, run) / "lightning" / "last.ckpt")}
    trainer.fit(model, loader, ckpt_path=resume_from.get(run))
    record.final = {
        "model": full_tensors(model.net.state_dict()),
        "optimizer": full_tensors(trainer.optimizers[0].state_dict()),
    }
    record.write()


def lightning_sharded_reshard(workdir: Path) -> None:
    """Load the 2-rank job's last checkpoint on 1 rank (WORKDIR/reshard.rank0)."""
    codes = launch(lightning_sharded_run, workdir, "reshard", world=1)
    if codes != [0]:
        sys.exit(f"run reshard ended with {codes}")


def lightning_sharded_version_error(workdir: Path) -> str:
    import lightning

    from ckptd.client.integrations.lightning_sharded import CkptdModelParallelStrategy

    return version_error(lightning, "2.1.4", lambda: CkptdModelParallelStrategy(str(workdir / "unused")))


def lightning_pointers(workdir: Path) -> None:
    """Load pointers that name a step never committed, and a file that is no pointer; write what each
    gave (the step loaded, or the error) to WORKDIR/pointers.json."""
    import json

    from ckptd.client.integrations.lightning import CkptdCheckpointIO, Pointer

    root = job_dir(workdir, "resume") / "ckpt"
    io = CkptdCheckpointIO(str(root))
    lost = STEPS + 1  # a save the job died before committing
    cases = {"last-v1.ckpt": Pointer(str(root), lost), "epoch=9-step=21.ckpt": Pointer(str(root), lost)}
    for name, pointer in cases.items():
        pointer.write(str(workdir / name))
    torch.save({"state_dict": {}}, workdir / "plain.ckpt")
    outcome: Dict[str, Any] = {}
    for name in [*cases, "plain.ckpt"]:
        try:
            outcome[name] = io.load_checkpoint(workdir / name)["global_step"]
        except Exception as exc:  # the test checks the type and the words
            outcome[name] = f"{type(exc).__name__}: {exc}"
    (workdir / "pointers.json").write_text(json.dumps(outcome))


def lightning_version_error(workdir: Path) -> str:
    import lightning

    from ckptd.client.integrations.lightning import CkptdCheckpointIO

    return version_error(lightning, "2.1.4", lambda: CkptdCheckpointIO(str(workdir / "unused")))


# --- Hugging Face Trainer ---------------------------------------------------------------------------


class Tokens(torch.utils.data.Dataset):
    """A fixed set of token sequences for a causal LM."""

    def __init__(self, samples: int = 64, length: int = 12, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(0, vocab, (samples, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def transformers_run(workdir: Path, run: str, rank: int) -> None:
    from transformers import TrainerCallback, TrainingArguments

    from ckptd.client.integrations.transformers import CkptdTrainer

    record = Record(workdir, run, rank)

    class Recording(CkptdTrainer):
        def training_step(self, model: Any, inputs: Dict[str, Any], *args: Any) -> torch.Tensor:
            loss = super().training_step(model, inputs, *args)
            record.step(self.state.global_step + 1, float(loss), None, inputs["input_ids"])
            return loss

    class CrashAfterSave(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            record.model_after(state.global_step, model)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if run == "crash" and state.global_step == CRASH_AT[FRAMEWORK]:
                crash(record)

    args = TrainingArguments(
        output_dir=str(job_dir(workdir, run) / "hf"),
        max_steps=STEPS,
        save_steps=SAVE_EVERY[FRAMEWORK],
        save_total_limit=2,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="cosine",
        seed=5,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Recording(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=[CrashAfterSave()])
    trainer.train(resume_from_checkpoint=True if run == "resume" else None)
    record.final = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
    record.write()


def transformers_export(workdir: Path) -> None:
    """`ckptd export` the newest checkpoint's model, load it with `from_pretrained`, and write both its
    logits and those of the model the resumed run ended with to WORKDIR/export.pt."""
    import subprocess

    from transformers import AutoModelForCausalLM

    from ckptd.client.loading import latest_checkpoint

    checkpoint = latest_checkpoint(str(job_dir(workdir, "resume") / "hf" / "ckptd"))
    out = workdir / "exported"
    command = [sys.executable, "-m", "ckptd.service", "export", str(checkpoint), "--component", "model"]
    subprocess.run([*command, "--out", str(out)], check=True)
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    trained = tiny_llama()
    trained.load_state_dict(torch.load(workdir / "resume.rank0", weights_only=False)["final"]["model"])
    inputs = Tokens().ids[:2]
    with torch.no_grad():
        logits = {"exported": exported(inputs).logits, "trained": trained(inputs).logits}
    torch.save({**logits, "files": sorted(p.name for p in out.iterdir())}, workdir / "export.pt")


BEST_STEPS = 8
"""The keep-best run: evaluated and saved every 2 steps, the best by the *highest* eval loss (an early
step, not the newest), save_total_limit=1."""


def transformers_best_run(workdir: Path, run: str, rank: int) -> None:
    """Train with `load_best_model_at_end`; record each step's model, each evaluation's loss, and the
    model the Trainer holds at the end (the best one, loaded from ckptd)."""
    from transformers import TrainerCallback, TrainingArguments

    from ckptd.client.integrations.transformers import CkptdTrainer

    record = Record(workdir, run, rank)
    evaluations: Dict[int, float] = {}

    class Recording(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            record.model_after(state.global_step, model)

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            evaluations[state.global_step] = float(metrics["eval_loss"])

    args = TrainingArguments(
        output_dir=str(workdir / run / "hf"),
        max_steps=BEST_STEPS,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        seed=5,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = tiny_llama()
    trainer = CkptdTrainer(
        model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(samples=16), callbacks=[Recording()]
    )
    trainer.train()
    record.final = {"model": model.state_dict(), "evaluations": evaluations}
    record.write()


def transformers_after(workdir: Path) -> None:
    """The export check, then the keep-best run."""
    transformers_export(workdir)
    codes = launch(transformers_best_run, workdir, "best")
    if codes != [0] * WORLD:
        sys.exit(f"run best ended with {codes}")


def transformers_version_error(workdir: Path) -> str:
    import transformers

    from ckptd.client.integrations.transformers import CkptdTrainer

    return version_error(transformers, "4.57.1", lambda: CkptdTrainer(model=tiny_llama()))


# --- Accelerate -------------------------------------------------------------------------------------


def accelerate_run(workdir: Path, run: str, rank: int) -> None:
    from accelerate import Accelerator, DataLoaderConfiguration

    from ckptd.client import CheckpointManager
    from ckptd.client.integrations.accelerate import AcceleratorComponents

    record = Record(workdir, run, rank)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))  # RNG per rank matters
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    loader = torch.utils.data.DataLoader(data(), batch_size=4, generator=torch.Generator().manual_seed(3))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    torch.manual_seed(100 + rank)  # dropout draws differ per rank
    manager = CheckpointManager(AcceleratorComponents(accelerator), str(job_dir(workdir, run) / "ckpt"))
    step = manager.load_checkpoint().step if run == "resume" else 0
    while step < STEPS:
        for x, y in loader:
            step += 1
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            record.step(step, loss.item(), accelerator.unwrap_model(model), x)
            if step % SAVE_EVERY[FRAMEWORK] == 0 or step == STEPS:
                manager.save_checkpoint(step)
            if run == "crash" and step == CRASH_AT[FRAMEWORK]:
                crash(record)
            if step == STEPS:
                break
    manager.close()
    record.final = {"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict()}
    record.write()


def accelerate_version_error(workdir: Path) -> str:
    import accelerate

    from ckptd.client.integrations.accelerate import AcceleratorComponents

    return version_error(accelerate, "0.34.2", lambda: AcceleratorComponents(None))


FRAMEWORKS: Dict[str, Dict[str, Callable[..., Any]]] = {
    "accelerate": {"run": accelerate_run, "version_error": accelerate_version_error},
    "lightning": {"run": lightning_run, "version_error": lightning_version_error, "after": lightning_pointers},
    "lightning-sharded": {
        "run": lightning_sharded_run,
        "version_error": lightning_sharded_version_error,
        "after": lightning_sharded_reshard,
    },
    "transformers": {
        "run": transformers_run,
        "version_error": transformers_version_error,
        "after": transformers_after,
    },
}


# --- launching -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(run: Callable[[Path, str, int], None], workdir: Path, name: str, world: int = WORLD) -> List[int]:
    """Fork `world` ranks that run `run` with torchrun's environment; their exit statuses."""
    return reap(start(run, workdir, name, world))


def reap(pids: List[int]) -> List[int]:
    """The exit statuses of the ranks `start` forked."""
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def start(run: Callable[[Path, str, int], None], workdir: Path, name: str, world: int = WORLD) -> List[int]:
    """Fork `world` ranks that run `run` with torchrun's environment; their pids."""
    port, pids = free_port(), []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os.environ.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                GROUP_RANK="0",
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                TORCHELASTIC_RUN_ID=f"{name}-{port}",
            )
            status = 0
            try:
                run(workdir, name, rank)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        pids.append(pid)
    return pids


def main() -> None:
    global FRAMEWORK
    framework, workdir = sys.argv[1], Path(sys.argv[2])
    FRAMEWORK = framework
    torch.set_num_threads(1)
    jobs = FRAMEWORKS[framework]
    (workdir / "version_error.txt").write_text(jobs["version_error"](workdir))
    # the uninterrupted run and the one that crashes are independent: they run side by side; then the resume
    started = {name: start(jobs["run"], workdir, name) for name in ("reference", "crash")}
    for name in RUNS:
        codes = reap(started[name]) if name in started else launch(jobs["run"], workdir, name)
        expected = [-signal.SIGKILL] * WORLD if name == "crash" else [0] * WORLD
        print(f"run {name}: exit statuses {codes}", flush=True)
        if codes != expected:
            sys.exit(f"run {name} ended with {codes}, expected {expected}")
    if "after" in jobs:
        jobs["after"](workdir)


if __name__ == "__main__":
    main()
