# Fewer, shorter and more focused samples, each ending at <|endoftext|>:
#     python sample.py config/sample_short.py [--key=value ...]
num_samples = 3
max_new_tokens = 100
temperature = 0.7
top_p = 0.9
stop_at_eot = True
