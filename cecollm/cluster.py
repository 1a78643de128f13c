"""Independent work on a Ray cluster (`pip install cecollm[cluster]`): actors that each load the model
once take work items as they free up; results come back in the items' order.

ray=True starts a local cluster of `workers` CPUs for the call and stops it afterwards; an address
("auto", "ray://host:10001") joins an existing one and leaves it running.
"""

from __future__ import annotations


def run_ordered(actor_cls, actor_args: tuple, method: str, items: list, address=True, workers: int = 2,
                on_done=None) -> list:  # fmt: skip
    """[actor.method(*item) for item in items], spread over `workers` actors of actor_cls(*actor_args)."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("Ray is not installed: pip install 'cecollm[cluster]'") from exc
    if workers < 1:
        raise ValueError("workers must be at least 1")
    started = not ray.is_initialized()
    if started:
        options = dict(log_to_driver=False, configure_logging=False)
        if address is True:
            ray.init(num_cpus=workers, include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    try:
        remote = ray.remote(num_cpus=1)(actor_cls)
        actors = [remote.remote(*actor_args) for _ in range(min(workers, len(items)) or 1)]
        out: list = [None] * len(items)
        todo = list(range(len(items)))[::-1]
        pending = {}

        def give(actor):
            if todo:
                i = todo.pop()
                pending[getattr(actor, method).remote(*items[i])] = (i, actor)

        for actor in actors:
            give(actor)
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(done)
            out[i] = ray.get(done)  # raises the worker's exception here
            if on_done is not None:
                on_done()
            give(actor)
        return out
    finally:
        if started:
            ray.shutdown()
