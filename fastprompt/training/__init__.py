"""The trainer behind `fastprompt train` and `fastprompt predict`.

settings.py holds the two commands' settings (TrainSettings, PredictSettings) and errors.py their
typed errors (the CLI prints them as one line, exit 2); tasks.py one class per task behind one
protocol (classification of sentences and pairs, token tagging, extractive QA, generation);
tables.py, conll.py, squad.py, text_pairs.py read their files; lm_encoding.py encodes
prompt/completion pairs and chats; generation.py generates with a trained prompt; metrics.py
scores them; model_loading.py loads the model (folders, hub ids, GGUF files, 8-bit and 4-bit);
loop.py trains; multitask.py trains several datasets in one run (a head per dataset on one
frozen backbone, one shared prompt or a bank) and prompt ensembles (--ensemble K); sweep.py runs a
grid of prompt lengths and learning rates (--sweep); train_state.py writes resumable checkpoints;
signals.py stops cleanly between steps; predict.py applies saved prompts to new data.
"""
