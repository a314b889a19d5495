"""STATUS filtered to a model or a worker (`blockllm status --model/--worker`): only what was
asked for, with the totals of what the broker has."""

from __future__ import annotations

from blockllm.broker.protocol import Status, StatusBody, StatusPage, StatusRequest, Totals, plain
from tests.unit.broker_harness import CHAIN, CLIENT, W0, W1, W2, Harness


def status(h: Harness, **kw) -> StatusBody:
    (out,) = h.send(CLIENT, StatusRequest("s", **kw))
    assert isinstance(out.msg, Status)
    return out.msg.body


def test_status_filters_by_model_and_by_worker() -> None:
    h = Harness()
    h.ready(W0, [("base", 0, CHAIN)])  # serves base, and ft where they share blocks
    h.ready(W1, [("ft", 0, CHAIN)])
    h.ready(W2, [("base", 0, 2)])
    everything = status(h)
    assert len(everything.workers) == 3 and set(everything.models) == {"base", "ft"}
    assert everything.totals == Totals(workers=3, models=2)

    ft = status(h, model="ft")  # w0's whole-chain stage holds base's layer 2, not ft's
    assert set(ft.models) == {"ft"} and {w.name for w in ft.workers} == {"w1", "w2"}
    assert ft.totals == Totals(workers=3, models=2)
    base = status(h, model="base")
    assert {w.name for w in base.workers} == {"w0", "w2"}

    w1 = status(h, worker="w1")
    assert [w.name for w in w1.workers] == ["w1"] and set(w1.models) == {"ft"}
    w2 = status(h, worker="w2")
    assert [w.name for w in w2.workers] == ["w2"]
    assert set(w2.models) == {"base", "ft"}  # positions 0-2 are shared by both
    assert status(h, worker="nobody").workers == ()
    assert status(h, model="nope").models == {}
    assert status(h, model="base", worker="w1").workers == ()


def test_status_comes_in_bounded_pages_that_merge_into_the_whole(monkeypatch) -> None:
    """A STATUS answer lists at most STATUS_PAGE workers and models (limit 0 or larger: the
    page size); the clients' merge of every page (client/demux.py merge_status) is the whole
    body, and a body without "page" (an older broker) is the only page."""
    from blockllm.broker import status as status_module
    from blockllm.client.demux import merge_status

    monkeypatch.setattr(status_module, "STATUS_PAGE", 2)
    h = Harness()
    for i, w in enumerate((W0, W1, W2, b"w3", b"w4")):
        h.ready(w, [("base" if i % 2 else "ft", 0, CHAIN)])
    whole = h.broker.status(h.now)
    assert whole.page is None and len(whole.workers) == 5
    first = status(h)
    assert len(first.workers) == 2 and first.page == StatusPage(offset=0, limit=2, next=2)
    assert status(h, limit=50).page.limit == 2  # never more than the broker's page
    body = plain(first)  # the clients merge the JSON-shaped pages
    offset, pages = merge_status(body, body), 1
    while offset:
        page = status(h, offset=offset)
        assert len(page.workers) <= 2 and len(page.models) <= 2
        offset = merge_status(body, plain(page))
        pages += 1
    body.pop("page")
    assert pages == 3 and body == plain(whole)
    old = {"workers": [], "models": {}}
    assert merge_status(old, old) == 0
