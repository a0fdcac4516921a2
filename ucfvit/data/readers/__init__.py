"""File readers: one class per file format, chosen by its name (``--data.kind``) from a registry.

``base.py`` holds the :class:`Reader` interface, :class:`DataError` and the registry; each built-in
format has its own module (``imagefolder.py``, ``nifti.py``, ``npy.py``), and ``headers.py`` reads
image sizes from PNG/JPEG headers.

A reader finds the files of a dataset (:meth:`Reader.items`), tells their channel count and spatial
shape cheaply (:meth:`Reader.header`), and reads an image or a region of it as float32 ``(C, *S)``
with raw values (:meth:`Reader.read`) or a label mask as int64 ``(*S)`` (:meth:`Reader.read_mask`).
Bad input is a :class:`DataError` whose message starts with the file it is about and names the
option to fix where one applies. Built in: ``imagefolder`` (JPEG/PNG/TIFF via OpenCV), ``nifti``
(nibabel) and ``npy`` (memory-mapped NumPy arrays).

A new format is one module with one reader class and its registry line (the decorator); :meth:`Reader.items` and
:meth:`Reader.read_mask` come from the base class. For example, headerless float32 volumes::

    @register_reader
    class RawReader(Reader):
        \"\"\"Little-endian float32 volumes of one fixed shape, e.g. ``scan.raw``.\"\"\"

        name, suffixes, spatial_ndim = "raw", (".raw",), 3
        shape = (128, 128, 128)

        def header(self, item):
            return 1, self.shape

        def read(self, item, region=None):
            vol = np.memmap(item.path, dtype="<f4", mode="r", shape=self.shape)
            return np.array(vol[self.slices(region)], dtype=np.float32)[None]
"""

from .base import READERS, DataError, Item, Reader, get_reader, register_reader
from .imagefolder import ImageFolderReader
from .nifti import NiftiReader
from .npy import NpyReader

__all__ = [
    "READERS",
    "DataError",
    "ImageFolderReader",
    "Item",
    "NiftiReader",
    "NpyReader",
    "Reader",
    "get_reader",
    "register_reader",
]
