"""OpenCV for the workers, held to one thread: Ray runs a worker per CPU, and OpenCV's own pool
ignores the OMP_NUM_THREADS that Ray sets (it would take every core in each worker). Modules
import cv2 from here, so that whichever loads first sets it."""

import cv2

cv2.setNumThreads(1)

__all__ = ["cv2"]
