"""The OpenVINO IR format: header check, metadata in rt_info, weight precisions an IR records."""
from __future__ import annotations

from pathlib import Path

IR_PRECISIONS = ("fp32", "fp16", "int8")  # weights of an IR, as its metadata records them


RT_INFO_ROOT = "lrformer_edge"


def check_ir_header(path: Path) -> None:
    """Refuse a file that is not IR XML before OpenVINO tries (and logs) every other frontend."""
    from xml.etree import ElementTree

    try:
        with open(path, "rb") as handle:
            _, root = next(ElementTree.iterparse(handle, events=("start",)))
    except (ElementTree.ParseError, StopIteration) as error:
        raise ValueError(f"{path} is not an OpenVINO IR: not readable as XML ({error})") from None
    if root.tag != "net":
        raise ValueError(f"{path} is not an OpenVINO IR: its root element is <{root.tag}>, "
                         f"expected <net>")


def write_rt_metadata(ov_model, metadata: dict[str, str]) -> None:
    """Store flat string metadata under rt_info/lrformer_edge (visible in the .xml)."""
    import json

    keys = [key.split(".", 1)[1] for key in metadata]
    for key, value in metadata.items():
        ov_model.set_rt_info(value, [RT_INFO_ROOT, key.split(".", 1)[1]])
    ov_model.set_rt_info(json.dumps(keys), [RT_INFO_ROOT, "keys"])


def read_rt_metadata(ov_model) -> dict:
    import json

    from lrformer_edge.artifacts.metadata import decode_metadata

    if not ov_model.has_rt_info([RT_INFO_ROOT, "keys"]):
        return {}
    keys = json.loads(ov_model.get_rt_info([RT_INFO_ROOT, "keys"]).astype(str))
    return decode_metadata({f"{RT_INFO_ROOT}.{k}": ov_model.get_rt_info([RT_INFO_ROOT, k]).astype(str)
                            for k in keys})


