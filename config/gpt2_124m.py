# GPT-2 small (124M), the model of the GPT-2 paper, with nanoGPT's OpenWebText recipe scaled to one GPU:
#   python train.py config/gpt2_124m.py --data=your_corpus/
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --data=your_corpus/
# 0.5M tokens per iteration as in the paper: 12 x 1024 x 40 = 491,520 (divide gradient_accumulation_steps
# by the number of GPUs under torchrun).
model = "gpt2"
tokenizer = "gpt2"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304  # 50257 padded to a multiple of 64: the same model, faster matmuls on GPUs
dropout = 0.0
bias = True
batch_size = 12
gradient_accumulation_steps = 40
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 1000
eval_iters = 200
log_interval = 10
compile = True
