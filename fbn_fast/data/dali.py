"""The DALI path: encoded JPEGs from the manifest decoded and augmented by NVIDIA DALI (optional extra ``dali``).

An external source in batch mode (a partial last batch is passed through, not dropped) feeds, per sample, the
encoded bytes (read and checked on the host, bad files replaced there), the augmentation window in pixels,
the rotation angle, the mirror flag, per-sample normalisation constants and the manifest row. DALI then runs:

``decoders.image_slice`` (``device="mixed"``: nvJPEG on the GPU, ROI decode of the window; ``"cpu"`` when
``device_id=None``) -> ``resize`` to ``size × size`` -> ``rotate`` (training) -> ``crop_mirror_normalize``
(mirror, brightness/contrast and ImageNet normalisation folded into per-sample mean/std, ``output_layout="HWC"``).

HWC output makes the NHWC tensor whose ``permute(0, 3, 1, 2)`` is the channels-last NCHW batch the model wants:
no copy. DALI outputs float16 or float32; bfloat16 is produced as float32 and cast in torch (DALI has no
bfloat16). Labels are gathered in torch from the manifest rows that travel through the pipeline beside the
images, so they stay aligned with them by construction.

Bad files are found and replaced on the host before DALI sees them: missing, empty, not a JPEG, truncated (no
end-of-image marker), unparsable header. A file that passes those checks but has corrupt entropy-coded data is
left to DALI's decoder, which conceals the damage (printing a warning) rather than failing; the CPU path's
strict decoder replaces such files, and the nvJPEG path replaces those that nvJPEG rejects.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    SampleSource,
    batch_rng,
    jpeg_size,
    pixel_window,
    sample_params,
)


class _Feeder:
    """The external source callable: one call, one batch of host-side inputs; StopIteration ends the epoch.

    Bad-image records of each fed batch wait in a queue until that batch comes out of the pipeline.
    """

    def __init__(self, backend: DaliBackend, epoch: int, start: int) -> None:
        self.b = backend
        self.epoch = epoch
        self.keys = ((start + i, rows) for i, rows in enumerate(backend.sampler.iter_from(epoch, start)))
        self.bad: collections.deque = collections.deque()
        self.pool = ThreadPoolExecutor(max(1, backend.threads))

    def _load(self, row: int, bad: list):
        def use(r: int, data: bytes):
            return data, jpeg_size(data)  # the header parse is also the last host-side check

        return self.b.source.load(row, use, bad)

    def __call__(self):
        try:
            b, rows = next(self.keys)
        except StopIteration:
            self.pool.shutdown()
            raise
        be = self.b
        n = len(rows)
        bad: list = []
        loaded = list(self.pool.map(lambda r: self._load(r, bad), rows.tolist()))
        rng = batch_rng(be.seed, self.epoch, b, be.rank) if be.train else None
        p = sample_params(n, be.train, be.aug, rng)
        jpegs, anchor, shape = [], np.empty((n, 2), np.float32), np.empty((n, 2), np.float32)
        index = np.empty(n, np.int64)
        for i, (row, (data, (h, w))) in enumerate(loaded):
            index[i] = row
            jpegs.append(np.frombuffer(data, np.uint8))
            x0, y0, ww, wh = pixel_window(be.source.box[row], h, w, p.window[i])
            ww, wh = min(ww, w - x0), min(wh, h - y0)  # keep the slice inside the image against rounding
            anchor[i] = (x0, y0)
            shape[i] = (max(ww, 1.0), max(wh, 1.0))
        mean = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
        std = np.asarray(IMAGENET_STD, np.float32) * 255.0
        bc = (p.brightness * p.contrast)[:, None]
        # (x - mean') / std' == (b (128 + c (x - 128)) - mean) / std
        mean_s = ((mean[None, :] - 128.0 * p.brightness[:, None] * (1.0 - p.contrast[:, None])) / bc).astype(np.float32)
        std_s = (std[None, :] / bc).astype(np.float32)
        self.bad.append(bad)
        if not be.train:  # no rotation in evaluation: the pipeline has no angle input
            return (jpegs, anchor, shape, p.flip.astype(np.int32), mean_s, std_s, index)
        return (jpegs, anchor, shape, p.angle.astype(np.float32), p.flip.astype(np.int32), mean_s, std_s, index)


class DaliBackend:
    """Runs one DALI pipeline per pass (a fresh one whenever iteration restarts, so prefetched batches of an
    abandoned pass are never handed out)."""

    name = "dali"

    def __init__(self, source: SampleSource, sampler, *, size: int, train: bool, aug: Augment, seed: int, rank: int,
                 num_workers: int, device: torch.device, dtype: torch.dtype) -> None:
        self.source, self.sampler = source, sampler
        self.size, self.train, self.aug, self.seed, self.rank = size, train, aug, seed, rank
        self.device, self.dtype = device, dtype
        self.threads = max(1, num_workers)
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        self.batch_size = int(sampler.batch_size)

    def _pipeline(self, feeder: _Feeder):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                        seed=self.seed & 0x7FFFFFFF, prefetch_queue_depth=2)
        out_type = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        with pipe:
            dtypes = [types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT, types.FLOAT,
                      types.INT64]
            if not self.train:
                del dtypes[3]
            inputs = fn.external_source(source=feeder, num_outputs=len(dtypes), batch=True, parallel=False,
                                        dtype=dtypes)
            if self.train:
                jpegs, anchor, shape, angle, mirror, mean, std, index = inputs
            else:
                jpegs, anchor, shape, mirror, mean, std, index = inputs
            decoder = "mixed" if self.device_id is not None else "cpu"
            # pixels as stored (no EXIF rotation), like the other paths: face boxes refer to that grid
            images = fn.decoders.image_slice(jpegs, anchor, shape, device=decoder, output_type=types.RGB,
                                             adjust_orientation=False, normalized_anchor=False,
                                             normalized_shape=False, axis_names="WH")
            images = fn.resize(images, size=[self.size, self.size], antialias=True)
            if self.train:
                images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0)
            images = fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, std=std, output_layout="HWC",
                                              dtype=out_type)
            pipe.set_outputs(images, index)
        pipe.build()
        return pipe

    def _to_torch(self, images) -> torch.Tensor:
        dense = images.as_tensor()
        shape = tuple(dense.shape())
        if self.device_id is None:
            nhwc = torch.from_numpy(np.array(dense))
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dt = torch.float16 if self.dtype == torch.float16 else torch.float32
            nhwc = torch.empty(shape, dtype=dt, device=self.device)
            feed_ndarray(dense, nhwc, cuda_stream=torch.cuda.current_stream(self.device))
        if nhwc.dtype != self.dtype:
            nhwc = nhwc.to(self.dtype)
        return nhwc.permute(0, 3, 1, 2)  # NHWC storage: a channels-last NCHW view

    def batches(self, epoch: int, start: int) -> Iterator[dict]:
        if start >= len(self.sampler):
            return
        feeder = _Feeder(self, epoch, start)
        pipe = self._pipeline(feeder)
        try:
            while True:
                try:
                    images, index = pipe.run()
                except StopIteration:
                    break
                image = self._to_torch(images)
                idx = torch.from_numpy(np.array(index.as_tensor()).reshape(-1).astype(np.int64))
                yield {"image": image, "index": idx, "_bad": feeder.bad.popleft()}
        finally:
            feeder.pool.shutdown(wait=False)
            del pipe

    def close(self) -> None:
        pass
