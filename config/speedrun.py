# The modded-nanogpt recipe (speedrun.py trained with Muon) on a byte-level corpus, sized for a laptop CPU:
#   python train.py config/speedrun.py --data=tinyshakespeare.txt
# Muon for the blocks' matrices, AdamW for the embedding, the head and the scalars, with modded-nanogpt's Adam
# beta1 0.8 and no weight decay. The learning rates were picked by 200-iteration runs on tinyshakespeare
# (README, "The models"); modded-nanogpt's own (Muon 0.05, Adam 0.008 for the head, 0.6 for the embedding) are for
# GPT-2 small on FineWeb, and train.py has one AdamW learning rate.
model = "speedrun"
optimizer = "muon"
tokenizer = "byte"
out_dir = "out-speedrun"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16
max_iters = 800
learning_rate = 2e-2   # AdamW: wte, lm_head, and any scalars
min_lr = 2e-3          # the cosine ends at a tenth; Muon's lr follows the same curve, from muon_lr
muon_lr = 0.05
muon_momentum = 0.95
beta1 = 0.8
beta2 = 0.95
weight_decay = 0.0
warmup_iters = 10
eval_interval = 200
eval_iters = 20
log_interval = 50
