"""broker/lifecycle.py's process helpers that need no child process."""


def test_freeze_heap_moves_the_live_objects_out_of_the_collectors_reach():
    import gc

    from blockllm.broker.lifecycle import freeze_heap

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        freeze_heap()
        # every tracked object alive at the call (this test's modules and more) is frozen
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()  # leave the test process as it was
