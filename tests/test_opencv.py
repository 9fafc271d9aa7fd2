"""The cv2 our UDFs import (udfs/opencv.py) is a headless build: dghs-imgutils pulls in
opencv-contrib-python, whose GUI build needs libGL and fails to import in containers without it
(the rayproject/ray images). `make install` and cluster.yaml put the same version's headless
contrib build in its place."""

from udfs.opencv import cv2


def build_setting(name: str) -> str:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in cv2's build information")


def test_cv2_has_no_gui_backend():
    assert build_setting("GUI") == "NONE"


def test_cv2_keeps_the_contrib_modules():
    # the headless build that replaces it is the contrib one: what imgutils may use stays
    assert hasattr(cv2, "ximgproc")
