import gc

from duetjax.gc_pauses import freeze_startup_heap, gc_pauses


def test_collections_are_timed():
    pauses = gc_pauses()
    assert gc_pauses() is pauses  # one timer per process
    before = pauses.snapshot()
    for _ in range(100):  # cyclic garbage: only the collector frees it
        a, b = [], []
        a.append(b)
        b.append(a)
    gc.collect()  # a full collection
    after = pauses.snapshot()
    assert after["collections"] > before["collections"]
    assert after["full_collections"] == before["full_collections"] + 1
    assert after["seconds"] > before["seconds"]
    assert 0 < after["longest_seconds"] <= after["seconds"]


def test_freezing_exempts_the_existing_heap():
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000  # every module, function and class so far
        survivor = [[]]
        assert gc.is_tracked(survivor)  # objects created afterwards are still collected
    finally:
        gc.unfreeze()  # (the rest of the test session keeps a normal collector)
