"""Records decoded in DataLoader workers, one image a record: transformed, or the reason it was skipped and the fix."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset as TorchDataset

from ..errors import ImageReadError
from .decode import skip_detail
from .records import Dataset, Record


class RecordImages(TorchDataset):
    """Item i -> (i, ``transform(image)``, "") or, for a file that does not decode, (i, None, its reason and fix):
    a bad file is a row to report, never an exception that stops the loader. The one decode-or-skip dataset of the
    feature extractor and the image cache (``transform`` must pickle: workers may be spawned)."""

    def __init__(self, dataset: Dataset, records: list[Record], transform: Callable, draft_size: int):
        self.reader, self.records, self.transform, self.draft_size = dataset.reader, records, transform, draft_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(self.reader.read_image(self.records[i].ref, draft_size=self.draft_size)), ""
        except (ImageReadError, OSError, KeyError) as err:
            return i, None, skip_detail(err)
