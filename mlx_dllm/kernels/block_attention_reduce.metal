// Combines the key splits of block_attention.metal: per output row, the splits' unnormalised sums are
// rescaled to the largest maximum and divided by the rescaled totals (a split that saw no key adds nothing).
// One thread per output element; params: splits, rows (B * Hq * Tq).

const int d = thread_position_in_grid.x;
const int row = thread_position_in_grid.y;
const int splits = params[0], rows = params[1];
float largest = -INFINITY;
for (int s = 0; s < splits; ++s) {
  largest = max(largest, partial_max[s * rows + row]);
}
float total = 0.0f, sum = 0.0f;
if (largest > -INFINITY) {
  for (int s = 0; s < splits; ++s) {
    const float weight = metal::exp(partial_max[s * rows + row] - largest);
    total += weight * partial_total[s * rows + row];
    sum += weight * partial_sums[(int64_t(s) * rows + row) * D + d];
  }
}
out[int64_t(row) * D + d] = T(total > 0.0f ? sum / total : 0.0f);
