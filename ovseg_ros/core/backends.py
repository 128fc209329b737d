"""Inference backends for the image tower + dense head (the only part that runs per frame).

The text embeddings stay outside every compiled artefact: classification is a matmul after the tower, so a
vocabulary change never rebuilds an engine (the problem users report with engines that bake the classes in).

- ``torch``: eager, inference mode (the reference).
- ``torch-compile``: torch.compile of the same module.
- ``onnxruntime``: ONNX export (per input shape) run by onnxruntime (CPU, CUDA or TensorRT execution provider).
- ``tensorrt``: torch.export -> torch_tensorrt.dynamo.compile (fp16) on a Jetson/CUDA machine.

Artefacts are cached in a directory keyed by everything that invalidates them; a corrupt entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from .clip_dense import ClipDenseEncoder

LOG = logging.getLogger("ovseg_ros.backends")
BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")


class BackendUnavailable(RuntimeError):
    """This backend cannot run here; the message says why (auto mode moves on to the next)."""


class DenseTower(torch.nn.Module):
    """Exactly the module every backend compiles: normalised pixels -> (global (B, D), dense (B, h, w, D)).

    Any module with `encoder` (its `device` and `model_id`), `variant` and `output_names` runs through the same
    backends (SED's tower: ``core/sed.py``)."""

    output_names = ("global", "dense")

    def __init__(self, encoder: ClipDenseEncoder, variant: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.visual = encoder.visual  # registers the weights as this module's parameters
        self.variant = variant

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.dense_features(pixels, self.variant)


def library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnxruntime", "onnx", "torch_tensorrt", "tensorrt"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:
            pass
    return versions


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}-sm{props.major}{props.minor}"
    return f"cpu-{platform.machine()}"


def cache_key(model_id: str, backend: str, shape: tuple[int, ...], precision: str, variant: str,
              device: torch.device) -> str:
    """Everything that makes an artefact invalid when it changes."""
    payload = json.dumps({"model": model_id, "backend": backend, "shape": list(shape), "precision": precision,
                          "variant": variant, "device": device_key(device), "versions": library_versions()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("OVSEG_ENGINE_CACHE", Path.home() / ".cache" / "ovseg_ros" / "engines"))


class TowerRunner:
    """Runs a DenseTower through one backend; `__call__(pixels)` like the module itself."""

    name = "torch"

    def __init__(self, tower: DenseTower) -> None:
        self.tower = tower

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower(pixels)


class CompiledRunner(TowerRunner):
    name = "torch-compile"

    def __init__(self, tower: DenseTower) -> None:
        super().__init__(tower)
        self.compiled = torch.compile(tower, dynamic=False)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compiled(pixels)


class OnnxRunner(TowerRunner):
    """ONNX export per image size with a dynamic batch (cached), run by onnxruntime with the best execution
    provider present; one artefact serves one camera or a batch of several."""

    name = "onnxruntime"

    def __init__(self, tower: DenseTower, cache_dir: Path, model_id: str, precision: str = "fp32") -> None:
        super().__init__(tower)
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed") from exc
        self.cache_dir = cache_dir
        self.model_id = model_id
        self.precision = precision
        self.sessions: dict[tuple[int, ...], object] = {}
        self.export_seconds: dict[tuple[int, ...], float] = {}

    def providers(self) -> list[str]:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if self.tower.encoder.device.type == "cuda" \
            else []
        return [p for p in wanted if p in available] + ["CPUExecutionProvider"]

    def _session(self, shape: tuple[int, ...]):
        import onnxruntime

        shape = shape[1:]  # (3, H, W): the batch dimension is dynamic
        if shape in self.sessions:
            return self.sessions[shape]
        key = cache_key(self.model_id, self.name, ("batch", *shape), self.precision, self.tower.variant,
                        self.tower.encoder.device)
        path = self.cache_dir / f"{key}.onnx"
        session = None
        if path.is_file():
            try:
                session = onnxruntime.InferenceSession(str(path), providers=self.providers())
            except Exception as exc:  # a truncated or corrupt artefact: rebuild it
                LOG.warning("cached ONNX model %s is unusable (%s); rebuilding", path, exc)
                path.unlink(missing_ok=True)
        if session is None:
            start = time.perf_counter()
            export_onnx(self.tower, shape, path)
            self.export_seconds[shape] = time.perf_counter() - start
            LOG.info("exported %s for input %s in %.1f s", path, shape, self.export_seconds[shape])
            session = onnxruntime.InferenceSession(str(path), providers=self.providers())
        self.sessions[shape] = session
        return session

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        session = self._session(tuple(pixels.shape))
        outputs = session.run(None, {"pixels": pixels.detach().cpu().numpy()})
        return tuple(torch.from_numpy(output).to(pixels.device) for output in outputs)


def export_onnx(tower: DenseTower, shape: tuple[int, ...], path: Path) -> None:
    """ONNX graph of the tower for (batch, *shape) inputs, batch 1..8."""
    from torch.export import Dim

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    example = torch.zeros((2, *shape[-3:]), device=tower.encoder.device)  # batch 1 would be specialised away
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(tower, (example,), str(tmp), input_names=["pixels"], output_names=list(tower.output_names),
                          dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={"pixels": {0: Dim("batch", min=1, max=8)}})
    tmp.replace(path)


def export_program(tower: DenseTower, shape: tuple[int, ...], dynamic_batch: bool = True):
    """torch.export of exactly the module torch-tensorrt compiles (batch dimension dynamic)."""
    from torch.export import Dim, export

    # Trace with batch 2: an example of batch 1 lets export specialise the batch dimension to a constant.
    example = torch.zeros((2 if dynamic_batch else shape[0], *shape[1:]), device=tower.encoder.device)
    dynamic = {"pixels": {0: Dim("batch", min=1, max=8)}} if dynamic_batch else None
    with torch.no_grad():
        return export(tower, (example,), dynamic_shapes=dynamic)


class TensorRTRunner(TowerRunner):
    """torch-tensorrt (dynamo) compile of the exported program, fp16, batch 1..8; cached on disk per key."""

    name = "tensorrt"

    def __init__(self, tower: DenseTower, cache_dir: Path, model_id: str, precision: str = "fp16") -> None:
        super().__init__(tower)
        if tower.encoder.device.type != "cuda":
            raise BackendUnavailable("the tensorrt backend needs a CUDA device")
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as exc:
            raise BackendUnavailable(f"torch_tensorrt cannot be imported: {exc}") from exc
        self.cache_dir = cache_dir
        self.model_id = model_id
        self.precision = precision
        self.engines: dict[tuple[int, ...], object] = {}

    def _engine(self, shape: tuple[int, ...]):
        import torch_tensorrt

        if shape[1:] in self.engines:  # one engine (batch 1..8) per image size: one camera or several
            return self.engines[shape[1:]]
        key = cache_key(self.model_id, self.name, shape[1:], self.precision, self.tower.variant,
                        self.tower.encoder.device)
        path = self.cache_dir / f"{key}.ep"
        engine = None
        if path.is_file():
            try:
                engine = torch_tensorrt.load(str(path)).module()
            except Exception as exc:
                LOG.warning("cached TensorRT engine %s is unusable (%s); rebuilding", path, exc)
                path.unlink(missing_ok=True)
        if engine is None:
            LOG.info("building a TensorRT engine for %s (first start on this device takes minutes)", shape)
            program = export_program(self.tower, shape)
            dtype = torch.float16 if self.precision == "fp16" else torch.float32
            inputs = [torch_tensorrt.Input(min_shape=(1, *shape[1:]), opt_shape=shape, max_shape=(8, *shape[1:]),
                                           dtype=torch.float32)]
            engine = torch_tensorrt.dynamo.compile(program, inputs=inputs, enabled_precisions={dtype})
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # the Input ranges keep the batch dynamic in the saved program
                torch_tensorrt.save(engine, str(path), arg_inputs=inputs)
            except TypeError:  # torch-tensorrt before 2.4 names the argument `inputs`
                torch_tensorrt.save(engine, str(path), inputs=inputs)
        self.engines[shape[1:]] = engine
        return engine

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(output.float() for output in self._engine(tuple(pixels.shape))(pixels))


class AutoRunner(TowerRunner):
    """Times every available backend on the first real input and keeps the fastest (logged with the timings)."""

    name = "auto"

    def __init__(self, tower: DenseTower, candidates: list[TowerRunner], runs: int = 3) -> None:
        super().__init__(tower)
        self.candidates = candidates or [TowerRunner(tower)]
        self.runs = runs
        self.chosen: TowerRunner | None = None
        self.timings_ms: dict[str, float] = {}

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chosen is None:
            for runner in self.candidates:
                try:
                    runner(pixels)  # warm-up: export / compile / engine build happen here
                    times = []
                    for _ in range(self.runs):
                        start = time.perf_counter()
                        runner(pixels)
                        times.append((time.perf_counter() - start) * 1000)
                    self.timings_ms[runner.name] = sorted(times)[len(times) // 2]
                except Exception as exc:  # a backend that fails here is simply not chosen
                    LOG.warning("backend auto: %s failed on the first frame (%s)", runner.name, exc)
            fastest = min(self.timings_ms, key=self.timings_ms.get) if self.timings_ms else "torch"
            self.chosen = next((r for r in self.candidates if r.name == fastest), TowerRunner(self.tower))
            LOG.info("backend auto -> %s (median ms per backend: %s)", self.chosen.name,
                     ", ".join(f"{k} {v:.1f}" for k, v in self.timings_ms.items()))
        return self.chosen(pixels)


def make_runner(encoder: ClipDenseEncoder, variant: str, backend: str, precision: str = "fp32",
                cache_dir: str | Path | None = None, tower: torch.nn.Module | None = None) -> TowerRunner:
    """Build one backend for `tower` (the CLIP dense tower of `encoder` and `variant` by default); 'auto' times
    the available ones (tensorrt, onnxruntime, torch) on the first frame and keeps the fastest, logging the
    timings and why any was skipped."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    tower = (tower if tower is not None else DenseTower(encoder, variant)).eval()
    if backend == "torch":
        return TowerRunner(tower)
    if backend == "torch-compile":
        return CompiledRunner(tower)
    if backend == "onnxruntime":
        return OnnxRunner(tower, cache, encoder.model_id, precision)
    if backend == "tensorrt":
        return TensorRTRunner(tower, cache, encoder.model_id, "fp16" if precision == "fp32" else precision)
    if backend == "auto":
        candidates = []
        order = ["tensorrt", "onnxruntime", "torch"] if encoder.device.type == "cuda" else ["onnxruntime", "torch"]
        for candidate in order:
            try:
                candidates.append(make_runner(encoder, variant, candidate, precision, cache, tower))
            except BackendUnavailable as exc:
                LOG.info("backend auto: %s skipped (%s)", candidate, exc)
        return AutoRunner(tower, candidates)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or auto")
