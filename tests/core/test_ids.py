import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from weightwise import IndexedDataset, sample_ids_from_batch


def test_tuple_items_get_index_appended_and_survive_shuffled_workers():
    data = TensorDataset(torch.arange(20).float() * 10, torch.arange(20))
    loader = DataLoader(IndexedDataset(data), batch_size=6, shuffle=True, num_workers=2)
    seen = []
    for batch in loader:
        x, y, ids = batch
        assert torch.equal(ids, y)  # the id is the dataset index of exactly this sample
        assert torch.equal(x, ids.float() * 10)
        assert torch.equal(sample_ids_from_batch(batch), ids)
        seen.append(ids)
    assert sorted(torch.cat(seen).tolist()) == list(range(20))


def test_mapping_items_get_a_key():
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"x": torch.tensor([float(i)])}

    batch = next(iter(DataLoader(IndexedDataset(Dicts()), batch_size=5)))
    assert torch.equal(sample_ids_from_batch(batch), torch.arange(5))
    custom = next(iter(DataLoader(IndexedDataset(Dicts(), key="idx"), batch_size=5)))
    assert torch.equal(sample_ids_from_batch(custom, key="idx"), torch.arange(5))


def test_existing_key_is_not_overwritten():
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"sample_id": 7}

    with pytest.raises(KeyError, match="another key"):
        IndexedDataset(Dicts())[0]


def test_missing_ids_error_names_the_fix():
    with pytest.raises(ValueError, match="IndexedDataset"):
        sample_ids_from_batch({"x": torch.rand(3)})
    with pytest.raises(ValueError, match="IndexedDataset"):
        sample_ids_from_batch((torch.rand(3, 2), torch.rand(3)))
    with pytest.raises(ValueError, match="IndexedDataset"):
        # integer labels in a plain tuple are never taken for ids
        sample_ids_from_batch((torch.rand(3, 2), torch.tensor([0, 1, 2])))


def test_single_tensor_items_become_a_pair():
    item = IndexedDataset(torch.arange(4).float())[2]
    assert item.field0 == 2.0 and item.sample_id == 2


def test_iterable_dataset_rejected():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield 1

    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(Stream())
