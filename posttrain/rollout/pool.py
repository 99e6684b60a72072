"""A Ray pool of rollout engines: the trainer's one ``RolloutEngine``, served by N engine actors.

    from posttrain.rollout.pool import EngineSpec, RolloutPool, weights_for_engine

    pool = RolloutPool(EngineSpec(kind="hf", model_path="runs/.../model"), num_engines=2)
    completions = pool.generate(requests, seed=7)         # in request order, every prompt once
    pending = pool.submit(requests, seed=8)               # or asynchronously: train meanwhile ...
    completions = pool.collect(pending)                   # ... and collect later
    pool.update_weights(weights_for_engine(model, "full"), version=1)   # or "lora": adapter only
    pool.sync_seconds, pool.restarts, pool.last_sync      # for logging
    pool.close()

- **Ray**: ``address="local"`` (default) starts a private local Ray (``num_cpus`` CPUs, no
  dashboard, token auth off: ``RAY_AUTH_MODE=disabled``); ``"auto"`` or ``"ray://host:port"``
  joins a cluster, where each engine gets a placement group of its own (its ``num_cpus`` /
  ``num_gpus``, packed on one node). A Ray session already started by the caller is reused.
- **Engines** are built inside their actors from a picklable `EngineSpec`: ``hf`` loads a saved
  Hugging Face folder into an `HFEngine`; ``vllm`` builds
  ``posttrain.rollout.vllm_engine.VLLMEngine(**spec.kwargs)`` (imported inside the actor only).
- **Requests** are split into contiguous shares, one per engine, each sent as chunks of
  ``chunk_size``; every request keeps its global position, from which its sampling seed is
  derived (`posttrain.rollout.hf.request_seed`), so the completions do not depend on how many
  engines there are: a pool of 2 HF engines returns exactly what one in-process engine does.
- **Weights** are versioned: ``update_weights(state, version)`` puts the state in the object
  store once and every actor loads it; versions must increase; a batch whose completions carry
  different versions (or not the pool's) is refused. ``state`` is a full state dict or a
  `LoraUpdate` (the peft adapter's tensors and config, not a merged copy; the actor wraps its
  model with the same adapter config on the first one). ``sync_seconds`` accumulates the time
  spent; ``last_sync`` names the tensors sent. ``update_weights(..., wait=False)`` only queues
  the loads (each actor runs them before any later batch) and confirms them at the next push.
- **Faults**: actors restart (Ray ``max_restarts``); when one dies mid-batch, its finished
  chunks are kept, the pool waits for the restarted actor, loads it with the current weights and
  version, and re-sends only its unfinished chunks, so every prompt is answered exactly once.
  When newer weights were pushed while the batch was generating (one-step-off), the restarted
  engine has only those, and a batch never mixes versions: the whole batch is generated again
  with the new weights (``regenerated_batches``).
  An engine that has not answered its share within ``timeout_s`` is restarted and a
  `RolloutTimeoutError` names it (``engine 1 of 2 (hf, node 10.0.0.5, pid 4242) did not answer
  within 120 s``); the pool stays usable.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.errors import RolloutTimeoutError
from posttrain.rollout.engine import Completion, GenerationRequest, RolloutEngine

ENGINE_KINDS = ("hf", "vllm")


def start_ray(address: str = "local", num_cpus: int | None = None) -> bool:
    """Start (``local``) or join (``auto``, ``ray://...``) Ray unless it is running; True when
    this call started it (its owner shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address in ("local", "", None):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def ray_get(ref, timeout=None):
    """``ray.get`` that re-raises a remote user error (a bad reward plugin, a bad request) as
    itself, so the CLI prints its one line."""
    import ray

    from posttrain.errors import UserError

    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        raise


@dataclass(frozen=True)
class EngineSpec:
    """How an actor builds its engine (picklable; nothing is loaded until the actor starts)."""

    kind: str = "hf"  # hf | vllm
    model_path: str = ""  # hf: a saved Hugging Face folder (model + tokenizer)
    batch_size: int = 64  # hf: rows per generate call
    stop_token_ids: tuple[int, ...] | None = None
    num_cpus: float = 1.0  # resources of each engine actor
    num_gpus: float = 0.0
    kwargs: dict = field(default_factory=dict)  # vllm: VLLMEngine(**kwargs)

    def build(self) -> RolloutEngine:
        if self.kind == "hf":
            from posttrain.models.qwen_omni import load_language_model
            from posttrain.rollout.hf import HFEngine

            model, tokenizer = load_language_model(self.model_path, "rollout engine model")
            if self.num_gpus and torch.cuda.is_available():
                model = model.cuda()
            stops = list(self.stop_token_ids) if self.stop_token_ids is not None else None
            return HFEngine(model.eval(), tokenizer, batch_size=self.batch_size, stop_token_ids=stops)
        if self.kind == "vllm":
            from posttrain.rollout.vllm_engine import VLLMEngine  # heavy: only inside the actor

            return VLLMEngine(**self.kwargs)
        raise ValueError(f"unknown engine kind {self.kind!r}; one of {', '.join(ENGINE_KINDS)}")


@dataclass
class LoraUpdate:
    """A LoRA weight update: the peft adapter's tensors and its config, nothing else."""

    tensors: dict[str, torch.Tensor]
    config: Any  # a peft LoraConfig

    @classmethod
    def from_model(cls, model, adapter: str = "default") -> "LoraUpdate":
        import copy

        from peft import get_peft_model_state_dict

        tensors = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
        return cls(tensors, copy.deepcopy(model.peft_config[adapter]))


def weights_for_engine(model, sync: str = "full"):
    """What a trainer sends after an optimiser step: the full state dict, or (``sync="lora"``)
    only the peft adapter."""
    if sync == "lora":
        if not hasattr(model, "peft_config"):
            raise ValueError("LoRA weight sync needs a peft model (the trainer's model has no adapter)")
        return LoraUpdate.from_model(model)
    if sync != "full":
        raise ValueError(f"unknown weight sync {sync!r}; full or lora")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def wait_restarted(call, timeout_s: float):
    """``call()`` (an actor method's ``.remote``) once the actor is back from a restart: Ray
    answers 'unavailable' while it restarts and 'died' when it has no restarts left (raised)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise ray.exceptions.GetTimeoutError("the actor did not come back") from None
            time.sleep(0.2)


class EngineWorker:
    """The body of one engine actor: builds the engine once, generates, loads weights."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.engine = spec.build()
        params = inspect.signature(self.engine.generate).parameters
        self.takes_positions = "positions" in params

    def describe(self) -> dict:
        import ray

        return {"node": ray.util.get_node_ip_address(), "pid": os.getpid(), "version": self.engine.weight_version}

    def generate(self, requests: list[GenerationRequest], seed: int, positions: list[int]) -> list[Completion]:
        if self.takes_positions:
            return self.engine.generate(requests, seed=seed, positions=positions)
        return self.engine.generate(requests, seed=seed)  # an engine without per-request seeds

    def update_weights(self, state, version: int) -> int:
        if isinstance(state, LoraUpdate):
            from peft import get_peft_model, set_peft_model_state_dict

            model = self.engine.model
            if not hasattr(model, "peft_config"):  # first adapter: wrap the base model once
                model = get_peft_model(model, state.config)
                self.engine.model = model.eval()
            result = set_peft_model_state_dict(model, state.tensors)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"LoRA update has {len(unexpected)} unknown tensors, e.g. {unexpected[0]}")
            self.engine.update_weights(None, version)
        else:
            self.engine.update_weights(state, version)
        return self.engine.weight_version


@dataclass
class PendingBatch:
    """A submitted batch: the pool's bookkeeping until `RolloutPool.collect`."""

    requests: list[GenerationRequest]
    seed: int
    version: int
    outstanding: dict  # ObjectRef -> (engine index, global positions)
    started: list[float]  # per engine: when its share was (re)submitted


class RolloutPool(RolloutEngine):
    """N engine actors behind the `RolloutEngine` interface (see the module docstring)."""

    def __init__(self, spec: EngineSpec, num_engines: int = 2, address: str = "local", num_cpus: int | None = None,
                 timeout_s: float = 120.0, max_restarts: int = 3, chunk_size: int | None = None,
                 placement_groups: bool | None = None):
        import ray

        if num_engines < 1:
            raise ValueError("a rollout pool needs at least one engine")
        if spec.kind not in ENGINE_KINDS:
            raise ValueError(f"unknown engine kind {spec.kind!r}; one of {', '.join(ENGINE_KINDS)}")
        self.spec = spec
        self.num_engines = num_engines
        self.timeout_s = float(timeout_s)
        self.chunk_size = chunk_size or spec.batch_size
        self._owns_ray = start_ray(address, num_cpus or max(2, int(num_engines * spec.num_cpus + 0.999)))
        on_cluster = address not in ("local", "", None)
        self._placement_groups = []
        remote = ray.remote(EngineWorker)
        self.actors = []
        for i in range(num_engines):
            options = dict(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=max_restarts, max_task_retries=0)
            if placement_groups if placement_groups is not None else on_cluster:
                from ray.util.placement_group import placement_group
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                bundle = {"CPU": spec.num_cpus, **({"GPU": spec.num_gpus} if spec.num_gpus else {})}
                group = placement_group([bundle], strategy="STRICT_PACK")
                ray.get(group.ready(), timeout=self.timeout_s)
                self._placement_groups.append(group)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group)
            self.actors.append(remote.options(**options).remote(spec))
        self.nodes = [None] * num_engines
        self.pids = [None] * num_engines
        for i, info in enumerate(self._describe_all()):
            self.nodes[i], self.pids[i] = info["node"], info["pid"]
        self.weight_version = 0
        self._state_ref = None
        self._unconfirmed = None  # (actor refs, version, start, last_sync record) of a push not yet waited for
        self.sync_seconds = 0.0  # all weight syncs so far
        self.last_sync: dict = {}  # the last sync: seconds, tensors (names), bytes
        self.restarts = 0  # actor deaths recovered from
        self.resent_requests = 0  # requests sent again after their actor died
        self.regenerated_batches = 0  # whole batches generated again after a death across a version bump
        self._restarted: set[int] = set()  # killed after a timeout: recover before the next use

    # ------------------------------------------------------------------ naming and health

    def name(self, i: int) -> str:
        return f"engine {i + 1} of {self.num_engines} ({self.spec.kind}, node {self.nodes[i]}, pid {self.pids[i]})"

    def _describe_all(self) -> list[dict]:
        import ray

        refs = [a.describe.remote() for a in self.actors]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=self.timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise RolloutTimeoutError(f"engine {i + 1} of {self.num_engines} ({self.spec.kind}) did not start within {self.timeout_s:g} s") from None
        return out

    def _recover(self, i: int) -> None:
        """Wait for actor ``i``'s restart and load the current weights and version into it."""
        import ray

        try:
            info = wait_restarted(self.actors[i].describe.remote, self.timeout_s)
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"{self.name(i)} died and could not be restarted: {e}") from None
        except ray.exceptions.GetTimeoutError:
            raise RolloutTimeoutError(f"{self.name(i)} died and did not restart within {self.timeout_s:g} s") from None
        if info["pid"] == self.pids[i] and info["version"] == self.weight_version:
            return  # already recovered (several of its chunks failed with the same death)
        self.nodes[i], self.pids[i] = info["node"], info["pid"]
        self.restarts += 1
        if self.weight_version != info["version"]:
            if self._state_ref is None:
                raise RuntimeError(f"{self.name(i)} restarted at version {info['version']} and the pool holds no weights for version {self.weight_version}")
            ray.get(self.actors[i].update_weights.remote(self._state_ref, self.weight_version), timeout=self.timeout_s)

    # ------------------------------------------------------------------ generation

    def submit(self, requests: list[GenerationRequest], seed: int | None = None) -> PendingBatch:
        """Send ``requests`` to the engines and return at once; `collect` gathers them."""
        for i in sorted(self._restarted):
            self._restarted.discard(i)
            self._recover(i)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        pending = PendingBatch(list(requests), seed, self.weight_version, {}, [time.monotonic()] * self.num_engines)
        self._dispatch(pending)
        return pending

    def _dispatch(self, pending: PendingBatch) -> None:
        """Send every request of ``pending``: contiguous shares, one per engine, in chunks."""
        n = len(pending.requests)
        bounds = [round(k * n / self.num_engines) for k in range(self.num_engines + 1)]
        for i in range(self.num_engines):
            positions = list(range(bounds[i], bounds[i + 1]))
            for start in range(0, len(positions), self.chunk_size):
                self._send(pending, i, positions[start:start + self.chunk_size])

    def _send(self, pending: PendingBatch, i: int, positions: list[int]) -> None:
        ref = self.actors[i].generate.remote([pending.requests[p] for p in positions], pending.seed, positions)
        pending.outstanding[ref] = (i, positions)

    def collect(self, pending: PendingBatch) -> list[Completion]:
        """The completions of a submitted batch, in request order (recovering from dead actors)."""
        import ray

        results: dict[int, Completion] = {}
        while pending.outstanding:
            now = time.monotonic()
            busy = {i for i, _ in pending.outstanding.values()}
            wait = max(0.0, min(pending.started[i] + self.timeout_s - now for i in busy))
            ready, _ = ray.wait(list(pending.outstanding), num_returns=1, timeout=wait)
            if not ready:
                late = sorted(i for i in busy if pending.started[i] + self.timeout_s <= time.monotonic())
                if not late:
                    continue
                for i in late:  # restart it, so the pool stays usable after the error
                    ray.kill(self.actors[i], no_restart=False)
                    self._restarted.add(i)
                pending.outstanding.clear()
                raise RolloutTimeoutError(
                    "; ".join(f"{self.name(i)} did not answer within {self.timeout_s:g} s" for i in late)
                    + " (restarted; raise rollout.timeout_s if generation is just slow)"
                )
            for ref in ready:
                if ref not in pending.outstanding:
                    continue  # a chunk of a version this batch no longer waits for (see below)
                i, positions = pending.outstanding.pop(ref)
                try:
                    completions = ray_get(ref)
                except ray.exceptions.RayActorError:
                    # Died mid-batch: its finished chunks are kept; this one goes again once the
                    # actor is back with the current weights.
                    self._recover(i)
                    if pending.version != self.weight_version:
                        # The pool has moved on (one-step-off pushed newer weights while this batch
                        # was generating): the restarted engine has only the new weights, and one
                        # batch must not mix versions, so the whole batch goes again with them
                        # (staleness 0; the completions' log-probs are the new weights' own).
                        self.resent_requests += len(pending.requests)
                        self.regenerated_batches += 1
                        results.clear()
                        pending.outstanding.clear()  # the old version's chunks still running are ignored
                        pending.version = self.weight_version
                        pending.started = [time.monotonic()] * self.num_engines
                        self._dispatch(pending)
                        break
                    self.resent_requests += len(positions)
                    pending.started[i] = time.monotonic()
                    self._send(pending, i, positions)
                    continue
                for p, c in zip(positions, completions):
                    results[p] = c
        out = [results[p] for p in range(len(pending.requests))]
        versions = {c.weight_version for c in out}
        if versions != {pending.version}:
            raise RuntimeError(
                f"refusing a batch generated with mixed weight versions {sorted(versions)} (the pool was at version "
                f"{pending.version} when it was submitted): an engine missed a weight update"
            )
        return out

    def generate(self, requests: list[GenerationRequest], seed: int | None = None) -> list[Completion]:
        return self.collect(self.submit(requests, seed))

    # ------------------------------------------------------------------ weights

    def update_weights(self, state, version: int, wait: bool = True) -> None:
        """Load ``state`` (full state dict or `LoraUpdate`) into every engine, tagged ``version``.

        ``wait=False`` returns as soon as the state is in the object store and every actor has
        the load queued: an actor runs its calls in order, so the load happens after the batch it
        may be generating and before any batch submitted later, which is therefore generated with
        these weights (and says so in its versions). The loads are confirmed (errors raised, the
        whole time added to ``sync_seconds``) at the next ``update_weights``, `confirm_weights` or
        `close`. One-step-off training pushes this way: the trainer need not wait for the engines
        to finish the batch they are generating for its next step.
        """
        import ray

        if state is None:
            raise ValueError("a rollout pool holds its own copies of the weights: pass the state (weights_for_engine)")
        if version <= self.weight_version:
            raise ValueError(f"weight version {version} is not newer than the pool's version {self.weight_version}")
        self.confirm_weights()  # the previous push, if it was not waited for
        start = time.perf_counter()
        tensors = state.tensors if isinstance(state, LoraUpdate) else state
        ref = ray.put(state)
        self._state_ref, self.weight_version = ref, version
        refs = [a.update_weights.remote(ref, version) for a in self.actors]
        self.last_sync = {
            "seconds": time.perf_counter() - start,  # what the caller waited: replaced below when it waits
            "kind": "lora" if isinstance(state, LoraUpdate) else "full",
            "tensors": sorted(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "waited": wait,
        }
        self._unconfirmed = (refs, version, start, self.last_sync)
        if wait:
            self.confirm_weights()

    def confirm_weights(self) -> None:
        """Wait until every engine has loaded the last pushed weights (see `update_weights`)."""
        import ray

        if self._unconfirmed is None:
            return
        refs, version, start, record = self._unconfirmed
        self._unconfirmed = None
        for i, r in enumerate(refs):
            try:
                ray.get(r, timeout=self.timeout_s)
            except ray.exceptions.RayActorError:
                self._recover(i)
            except ray.exceptions.GetTimeoutError:
                ray.kill(self.actors[i], no_restart=False)
                self._restarted.add(i)
                raise RolloutTimeoutError(f"{self.name(i)} did not load weight version {version} within {self.timeout_s:g} s (restarted)") from None
        seconds = time.perf_counter() - start
        self.sync_seconds += seconds
        record["loaded_seconds"] = seconds
        if record["waited"]:
            record["seconds"] = seconds

    def close(self) -> None:
        import ray

        self._unconfirmed = None  # (the actors go now: nothing left to confirm)
        if not ray.is_initialized():
            return
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        for group in self._placement_groups:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
        self._placement_groups = []
        if self._owns_ray:
            ray.shutdown()
