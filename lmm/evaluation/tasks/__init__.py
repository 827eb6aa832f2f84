"""Benchmarks, one module each: prompt, `read` (published file -> `Sample`s), `parse`, metric and
`BENCHMARK = Benchmark(metric, score, headline, scale)`, the module's one declaration of how `lmm`
scores it by default (`lmm.evaluation.runner.BENCHMARKS` lists the modules that declare one).

Each module's docstring states the official rule it implements by default and the options that
reproduce LLaVA's kit, lmms-eval or VLMEvalKit where they differ (see docs in EVAL.md):

- `vqav2` (`VQAAccuracy`), `textvqa` (`TextVQAAccuracy`), `gqa` (`GQAAccuracy`)
- `scienceqa` (`ScienceQAAccuracy`), `pope` (`POPEMetrics`), `mme` (`MMEScore`)
- `mmbench` (`MMBenchCircular`), `mmmu` (`MMMUAccuracy`), `nlvr2` (`NLVR2Accuracy`)
- `qbench` (`QBenchAccuracy`), `blink` (`BLINKAccuracy`), `mvbench` (`MVBenchAccuracy`)
- `mantis_eval` (`MantisAccuracy`), `demon` (`DemonScore`), `videofeedback` (`VideoFeedbackSpearman`)

Shared pieces: `_normalize` (VQA answer normaliser), `_choices` (letter parsers), `_base`,
`_benchmark` (`Benchmark`, `same_answer`).
Metrics take `update(parsed_predictions, [sample.meta, ...])` and sync across ranks.
"""
