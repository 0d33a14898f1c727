// Block attention: the query rows of one KV head's whole GQA group, over the cache's keys and the block's own,
// with the visibility pattern computed here from a few integers (never a [Tq, Tk] mask).
//
// One threadgroup per (batch, KV head, row tile); simdgroup s owns ROWS query rows (row r = g * Tq + i: GQA
// head g, query i) and its 32 lanes split the head dimension. The threadgroup loads KEYS keys and values at a
// time into threadgroup memory, so the cache is read once per tile of rows, not once per query row; each row
// keeps an online softmax in fp32 registers.
//
// Long caches split their keys over `splits` threadgroups per row tile (SPLIT): each writes its unnormalised
// sums, maxima and running totals, and block_attention_reduce.metal combines them.
//
// Template: T (dtype), D (head dim; lane l holds elements l, l + 32, ...), KIND (0 bidirectional, 1 causal,
// 2 causal window, 3 bidirectional window, 4 quadratic layout, 5 draft tree), ROWS (rows per simdgroup), KEYS (keys
// per tile), SPLIT.
// params: Tq, Tc (cache keys), Tb (block keys), G (GQA group), Hkv, a, b, c, splits, where
//   causal: key j is visible to query i iff j <= a + i;
//   windows: query position a + i, key position c + j, window b;
//   quadratic: a cache keys seen by all, then `c` rows of c + 1 tokens ([d_i, masks]);
//   tree: a prefix keys, then the Tq rows; window b (0: none).
// tree (read by KIND 5 only): the rows' depths, then each row's lineage as ceil(Tq / 32) words (bit m set iff row m
// is the row or an ancestor). Row i sees prefix key j iff b == 0 or (a - j) + depth[i] < b, and block key a + m
// iff bit m is set and (b == 0 or depth[i] - depth[m] < b).
// Inputs are read through their strides: the cache is a slice of a larger buffer, and is never copied.

constexpr int LANE_ELEMS = (D + 31) / 32;
const int Tq = params[0], Tc = params[1], Tb = params[2], G = params[3], Hkv = params[4];
const int pa = params[5], pb = params[6], pc = params[7];
const int splits = params[8];
const int Tk = Tc + Tb;
const int R = G * Tq;  // query rows of this KV head's group
const int words = (Tq + 31) / 32;  // per tree row

const uint lane = thread_index_in_simdgroup;
const uint simd = simdgroup_index_in_threadgroup;
const uint tid = thread_position_in_threadgroup.x;
const uint threads = threads_per_threadgroup.x;
const int batch = threadgroup_position_in_grid.y / Hkv;
const int kv_head = threadgroup_position_in_grid.y % Hkv;
const int split = threadgroup_position_in_grid.z % splits;
const int first_row = ((threadgroup_position_in_grid.z / splits) * (threads / 32) + simd) * ROWS;

threadgroup T key_tile[KEYS * D];
threadgroup T value_tile[KEYS * D];

float q[ROWS][LANE_ELEMS];
float acc[ROWS][LANE_ELEMS];
float row_max[ROWS];
float row_sum[ROWS];
int row_query[ROWS];
for (int u = 0; u < ROWS; ++u) {
  const int r = first_row + u;
  row_query[u] = r < R ? r % Tq : -1;  // -1: a padding row (its lanes still join every barrier)
  row_max[u] = -INFINITY;
  row_sum[u] = 0.0f;
  const int head = kv_head * G + (r < R ? r / Tq : 0);
  const int64_t base =
      batch * queries_strides[0] + head * queries_strides[1] + (r < R ? r % Tq : 0) * queries_strides[2];
  for (int e = 0; e < LANE_ELEMS; ++e) {
    const int d = lane + 32 * e;
    q[u][e] = r < R && d < D ? float(queries[base + d * queries_strides[3]]) * scale : 0.0f;
    acc[u][e] = 0.0f;
  }
}

// Keys no row can see are never loaded.
int key_begin = 0, key_end = Tk;
if (KIND == 1) {
  key_end = min(Tk, pa + Tq);
} else if (KIND == 2 || KIND == 3) {
  key_begin = max(0, pa - pc - pb);
  key_end = min(Tk, pa + Tq - pc + pb + 1);
} else if (KIND == 5 && pb > 0) {
  key_begin = max(0, pa - pb + 1);  // a root (depth 0) sees the last b - 1 prefix keys, deeper rows fewer
}
if (SPLIT) {  // this threadgroup's share of the keys, in whole tiles
  const int share = ((key_end - key_begin + splits - 1) / splits + KEYS - 1) / KEYS * KEYS;
  key_begin = key_begin + split * share;
  key_end = min(key_end, key_begin + share);
}

for (int start = key_begin; start < key_end; start += KEYS) {
  for (uint index = tid; index < uint(KEYS * D); index += threads) {
    const int j = start + int(index) / D, d = int(index) % D;
    T key = T(0), value = T(0);
    if (j < Tc) {
      key = keys[batch * keys_strides[0] + kv_head * keys_strides[1] + j * keys_strides[2] + d * keys_strides[3]];
      value = values[batch * values_strides[0] + kv_head * values_strides[1] + j * values_strides[2] +
                     d * values_strides[3]];
    } else if (j < key_end) {
      const int jb = j - Tc;
      key = block_keys[batch * block_keys_strides[0] + kv_head * block_keys_strides[1] +
                       jb * block_keys_strides[2] + d * block_keys_strides[3]];
      value = block_values[batch * block_values_strides[0] + kv_head * block_values_strides[1] +
                           jb * block_values_strides[2] + d * block_values_strides[3]];
    }
    key_tile[index] = key;
    value_tile[index] = value;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const int tile_end = min(KEYS, key_end - start);
  for (int u = 0; u < ROWS; ++u) {
    const int i = row_query[u];
    if (i < 0) {
      continue;  // uniform across the simdgroup: every lane shares the row
    }
    const int depth = KIND == 5 ? int(tree[i]) : 0;
    for (int t = 0; t < tile_end; ++t) {
      const int j = start + t;
      bool visible = true;
      if (KIND == 1) {
        visible = j <= pa + i;
      } else if (KIND == 2) {
        const int distance = (pa + i) - (pc + j);
        visible = distance >= 0 && distance < pb;
      } else if (KIND == 3) {
        visible = abs((pa + i) - (pc + j)) <= pb;
      } else if (KIND == 4) {
        const int width = pc + 1;
        const int jj = j - pa;
        visible = jj < 0 || (jj % width == 0 && jj / width <= i / width) ||
                  (i % width != 0 && jj / width == i / width);
      } else if (KIND == 5) {
        const int m = j - pa;
        if (m < 0) {
          visible = pb == 0 || (pa - j) + depth < pb;
        } else {
          visible = ((tree[Tq + i * words + m / 32] >> (m % 32)) & 1u) != 0 &&
                    (pb == 0 || depth - int(tree[m]) < pb);
        }
      }
      if (!visible) {
        continue;
      }
      float partial = 0.0f;
      for (int e = 0; e < LANE_ELEMS; ++e) {
        const int d = lane + 32 * e;
        partial += d < D ? q[u][e] * float(key_tile[t * D + d]) : 0.0f;
      }
      const float score = simd_sum(partial);
      const float new_max = max(row_max[u], score);
      const float rescale = metal::exp(row_max[u] - new_max);
      const float weight = metal::exp(score - new_max);
      row_sum[u] = row_sum[u] * rescale + weight;
      for (int e = 0; e < LANE_ELEMS; ++e) {
        const int d = lane + 32 * e;
        acc[u][e] = acc[u][e] * rescale + (d < D ? weight * float(value_tile[t * D + d]) : 0.0f);
      }
      row_max[u] = new_max;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

for (int u = 0; u < ROWS; ++u) {
  const int r = first_row + u;
  if (r >= R) {
    continue;
  }
  const int head = kv_head * G + r / Tq;
  const int64_t row = (int64_t(batch) * Hkv * G + head) * Tq + r % Tq;
  if (SPLIT) {
    const int64_t at = int64_t(split) * threadgroups_per_grid.y * G * Tq + row;
    for (int e = 0; e < LANE_ELEMS; ++e) {
      if (lane + 32 * e < D) {
        partial_sums[at * D + lane + 32 * e] = acc[u][e];
      }
    }
    if (lane == 0) {
      partial_max[at] = row_max[u];
      partial_total[at] = row_sum[u];
    }
  } else {
    const float inverse = row_sum[u] > 0.0f ? 1.0f / row_sum[u] : 0.0f;
    for (int e = 0; e < LANE_ELEMS; ++e) {
      if (lane + 32 * e < D) {
        out[row * D + lane + 32 * e] = T(acc[u][e] * inverse);
      }
    }
  }
}
