"""The training loop, shared by every task: transformers' Trainer made safe and fast.

training/trainer.py      GuardedTrainer (NaN stop, complete-only checkpoints, disk checks, length-grouped
                         batches), TunelabTrainer (the chunked next-token loss), TrainingArguments mapping
training/checkpoints.py  checkpoints a run can be trusted to resume from
training/steps.py        how many optimizer steps an epoch takes (the trainer's count, and the dry run's)
training/callbacks.py    the progress bar and metrics.jsonl
"""
