"""The trainer behind `fastprompt train` and `fastprompt predict`.

tasks.py holds one class per task (classification of sentences and pairs, token tagging, extractive
QA); tables.py, conll.py, squad.py read their files; metrics.py scores them; loop.py trains;
train_state.py writes resumable checkpoints; signals.py stops cleanly between steps; predict.py
applies saved prompts to new data.
"""
