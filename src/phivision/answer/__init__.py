"""The answer layer: what the model is asked and how it answers, shared by training, evaluation and serving.

* :mod:`phivision.answer.prompt`: the question and the answer template, the answer parser;
* :mod:`phivision.answer.constrain`: constrained decoding (every answer follows the template, the category one of
  the run's);
* :mod:`phivision.answer.generate`: the one batched generation loop.
"""
