# The character-level Shakespeare model sized for a laptop CPU (nanoGPT's CPU recipe): minutes, not a day.
# tinyshakespeare is char-rnn's 1.1 MB corpus:
#   curl -O https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
#   python train.py config/shakespeare_char_cpu.py --data=input.txt
model = "gpt2"
tokenizer = "byte"
out_dir = "out-shakespeare-char-cpu"
device = "cpu"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0
batch_size = 12
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 50
