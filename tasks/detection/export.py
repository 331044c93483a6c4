"""The detectron2 package that ``bench export --format detectron2`` writes for a trained backbone: the weights
pickle (protocols.md §3.1; ViTDet renaming §3.7), one config per detectron2 family and a launch script each."""

from __future__ import annotations

import os
import stat

from bench import checkpoint as ckpt
from bench.backbones import DenseBackbone
from tasks.detection import d2_config, d2_convert


def _write_text(path: str, text: str, executable: bool = False) -> None:
    ckpt.atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
    if executable:
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def export_detectron2(backbone: DenseBackbone, output: str, gpus: int = 8) -> list[str]:
    """Write the pickle, the configs and the launch scripts; returns the written paths."""
    model, facts = d2_convert.backbone_to_d2(backbone)
    output = os.path.abspath(output)
    stem = output[:-4] if output.endswith(".pkl") else output
    if facts["kind"] == "vit":
        config_text = d2_config.vitdet_config_py(output, facts)  # raises for non-16 patches before writing
    d2_convert.write_pickle(model, output)
    written = [output]
    if facts["kind"] == "vit":
        cfg_path = f"{stem}.vitdet_mask_rcnn.py"
        _write_text(cfg_path, config_text)
        sh = f"{stem}.vitdet_mask_rcnn.sh"
        _write_text(sh, d2_config.launch_script(cfg_path, gpus, lazy=True), executable=True)
        return written + [cfg_path, sh]
    for family in d2_config.FAMILIES:
        if "C4" in family and facts["depth"] < 50:
            continue
        cfg = d2_config.detectron2_config(family, output, facts["depth"], facts["res2_out_channels"])
        cfg_path = f"{stem}.{family}.yaml"
        d2_config.dump_yaml(cfg, cfg_path, header=f"# detectron2 {family} for {os.path.basename(output)} "
                                                  f"(ResNet-{facts['depth']}), written by bench export")
        sh = f"{stem}.{family}.sh"
        _write_text(sh, d2_config.launch_script(cfg_path, gpus), executable=True)
        written += [cfg_path, sh]
    return written
