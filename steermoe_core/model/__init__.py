"""The SteerMoE model: steering (``steering``), the trainable adapter (``adapter``), the prompt
layout (``prompt``), the end-to-end module (``steermoe``), building it from a recipe (``build``)
and checkpoints (``checkpoint``). Nothing here imports training, evaluation or inference."""
