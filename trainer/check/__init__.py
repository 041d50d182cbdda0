"""The checking tools, built on top of the trainer and the builder (nothing below imports them).

``compare`` (native against custom on one config's batches, and bisect to the guilty layer),
``capture`` (a model's run recorded layer by layer, and two records compared), ``locate``
(where in a tensor a mismatch is), ``diff`` (the tensor comparison they all use), ``shadow``
(shadow mode inside a run), ``lockstep`` (native and custom trained side by side), ``diagnose``
(where a NaN began), ``report`` (plain-text tables), and ``attach`` (which adds shadow mode and
NaN diagnosis to a Trainer whose config asks for them).
"""
