"""How the official scorers read an answer: text in, verdict out, nothing else of mmlatent but its prompts.

`mmmu_parsing` is MMMU's parser (and lmms-eval's variant), `scienceqa_parsing` the three ScienceQA letter
rules (LLaVA's, the ScienceQA authors', lmms-eval's), and `protocols` names each scorer and judges a response
by its rules. Evaluation scores benchmark answers with them, and training's validation scores its generated
answers with the same rules, so both sit above this layer.
"""
