"""Downstream evaluation with EleutherAI lm-evaluation-harness, offline.

  code_tasks    items about Python code from held-out files (pure functions)
  task_files    the shipped tasks as harness YAML + JSONL (`upcycle eval prepare-tasks`)
  offline       the switches that keep datasets / hub clients off the network
  model_source  HF directory, or a Megatron checkpoint exported to a temporary one
  harness       task loading and lm_eval.simple_evaluate
  aggregate     flat rows (task, metric, value, stderr, n) and the core average
  evaluate      one evaluation -> eval.json (+ the harness's JSON), atomically
  run           an eval node of a sweep
  report        the report's "Downstream quality" section
"""
