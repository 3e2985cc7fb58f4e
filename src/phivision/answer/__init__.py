"""The answer layer: what the model is asked and how it answers, shared by training, evaluation and serving.

* :mod:`phivision.answer.prompt`: the question and the answer template, the answer parser;
* :mod:`phivision.answer.taxonomy`: the category space of an answer (the run's labels, a file, the dataset) and
  ``{categories}`` in the question;
* :mod:`phivision.answer.constrain`: constrained decoding (every answer follows the template, the category one of
  the taxonomy's);
* :mod:`phivision.answer.generate`: the one batched generation loop;
* :mod:`phivision.answer.price_spread`: the model's distribution over the price it writes, read from its answer;
* :mod:`phivision.answer.calibration`: split-conformal price ranges (numpy only);
* :mod:`phivision.answer.ranges`: an answer's range, and the calibration of a model on a split.
"""
