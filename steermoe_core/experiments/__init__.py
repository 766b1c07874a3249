"""The paper's experiments as commands: ablations over adapter variants (``ablate``) and what a
trained router does (``router_stats``, with its plots in ``plots``). Built on training, evaluation
and model; nothing below imports from here."""
