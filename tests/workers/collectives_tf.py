"""Run under horovodrun: TensorFlow collectives give exactly the expected values."""

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

hvd.init()
rank, size = hvd.rank(), hvd.size()
ranks = np.arange(size, dtype=np.float64)

x = tf.fill((3, 4), tf.constant(rank + 1, tf.float64))
np.testing.assert_array_equal(hvd.allreduce(x, op=hvd.Sum).numpy(), np.full((3, 4), (ranks + 1).sum()))
np.testing.assert_array_equal(hvd.allreduce(x, op=hvd.Average).numpy(), np.full((3, 4), (ranks + 1).mean()))

rows = tf.fill((rank + 1, 2), tf.constant(rank, tf.int32))
expected = np.concatenate([np.full((r + 1, 2), r, np.int32) for r in range(size)])
np.testing.assert_array_equal(hvd.allgather(rows).numpy(), expected)

payload = tf.range(5, dtype=tf.float32) * (rank + 10)
np.testing.assert_array_equal(hvd.broadcast(payload, root_rank=1).numpy(), np.arange(5, dtype=np.float32) * 11)

sent = tf.constant([100 * rank + dest for dest in range(size)], tf.int64)
received = hvd.alltoall(sent)
np.testing.assert_array_equal(received.numpy(), [100 * src + rank for src in range(size)])

print(f"collectives ok on rank {rank} of {size}", flush=True)
