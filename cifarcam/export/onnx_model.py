"""A trained model as ONNX (dynamic batch, float32), and its check against PyTorch with
onnxruntime. onnx, onnxscript (torch's ONNX exporter) and onnxruntime are the optional extra
`cifarcam[export]`."""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cifarcam.errors import CifarcamError, RunError

EXTRA_HINT = 'pip install "cifarcam[export]"'
INPUT, OUTPUT = "images", "logits"
# The largest difference accepted between onnxruntime's and PyTorch's float32 logits.
TOLERANCE = 1e-3
BATCH = 500  # images per forward pass of the check


def require_extra() -> None:
    """A one-line error when the export extra is missing, before any work is done."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise CifarcamError(
            "export needs onnx, onnxscript and onnxruntime, which are not installed", hint=EXTRA_HINT
        ) from None


def to_onnx(model: nn.Module, metadata: dict[str, str]) -> bytes:
    """The model (in eval mode, float32, on the CPU) as an ONNX file's bytes: input `images`
    (N, 3, 32, 32), output `logits` (N, classes), N free; `metadata` in its metadata_props."""
    import onnx

    model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    example = torch.zeros(2, 3, 32, 32)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes are for torch's developers
        path = Path(folder) / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # it reports its passes on stdout
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                verbose=False,
            )
        proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


@dataclass(frozen=True)
class Agreement:
    images: int
    max_difference: float  # the largest |onnxruntime - PyTorch| over all logits
    top1_agreement: float  # the fraction of images whose predicted class is the same


def check_against_pytorch(onnx_model: bytes, model: nn.Module, inputs: torch.Tensor) -> Agreement:
    """Run `inputs` (normalised, float32) through onnxruntime and through `model`; a RunError when
    the logits differ by more than TOLERANCE."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    model = model.float().cpu().eval()
    expected, got = [], []
    with torch.no_grad():
        for batch in inputs.cpu().split(BATCH):
            expected.append(model(batch))
            got.append(torch.from_numpy(session.run([OUTPUT], {INPUT: batch.numpy()})[0]))
    reference, exported = torch.cat(expected), torch.cat(got)
    difference = float((reference - exported).abs().max())
    agreement = float((reference.argmax(1) == exported.argmax(1)).double().mean())
    if not difference <= TOLERANCE:
        raise RunError(
            f"the ONNX model's logits differ from PyTorch's by up to {difference:.3g} on "
            f"{len(inputs)} test images (tolerance {TOLERANCE:g}); nothing was written"
        )
    return Agreement(len(inputs), difference, agreement)
