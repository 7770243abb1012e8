# nanoGPT's character-level Shakespeare baby GPT, on bytes (a GPU config: ~20 s/iter on a 2-core CPU;
# config/shakespeare_char_cpu.py is the laptop version). tinyshakespeare is char-rnn's 1.1 MB corpus:
#   curl -O https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
#   python train.py config/shakespeare_char.py --data=input.txt
model = "gpt2"
tokenizer = "byte"
out_dir = "out-shakespeare-char"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
batch_size = 64
max_iters = 5000
lr_decay_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False
