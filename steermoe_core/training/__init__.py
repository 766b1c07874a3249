"""Training: the loop (``loop``), the optimizer and schedule (``optim``), and the ``Strategy`` seam
that decides how a step is spread over processes (``strategy``)."""
