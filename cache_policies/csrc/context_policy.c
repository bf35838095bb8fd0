/* The default expert-cache policy (`context`, one instance per MoE layer as `PartitionedPolicy`
 * runs it) in native code: every layer's state in flat arrays, one call per victim and one per step.
 *
 * It makes the same decisions as cache_policies/partitioned.py over cache_policies/context.py (the
 * numpy code is its oracle, tests/cache_policies/test_native_context.py): the same formulas summed in
 * the same order (compiled with -ffp-contract=off), the same tie-breaks (first minimum in the layer's
 * insertion order of its resident keys), the age tables filled by the same libm calls.
 *
 * Keys are codes layer * E + expert. The Python side buffers insert / access / evict events as
 * kind * L * E + code and hands them over at the next victim or step call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define UNMATCHABLE 255 /* the overlap asked of a step that is not matched (max_keys < 255) */
enum { EV_INSERT = 0, EV_ACCESS = 1, EV_EVICT = 2 };
enum { SCORES_UNKNOWN = 0, SCORES_NONE = 1, SCORES_FOUND = 2 };
#define MAX_BLOCKS 64 /* arrays a context owns */

typedef struct {
    int L, E, W; /* layers, experts per layer, 64-bit words per key set */
    double frequency_weight, frequency_decay, recency_weight, recency_half_life, context_weight;
    int horizon, neighbours, history_steps, max_keys, ring;
    double share; /* slots per layer */
    int64_t step; /* steps ended (each layer's Markov clock: ages are differences, so one clock serves all) */
    int current;  /* layer of the last access, -1 before any */
    double *decay_table, *recency_table;
    int64_t table_len;
    /* Markov state, [L * E] unless noted */
    int64_t *last;
    double *frequency, *counts /* [L * E * E] */, *sources, *transition, *fallback, *priority;
    int *cur, *ncur /* [L] */, *prev, *nprev /* [L] */;
    uint8_t *in_cur, *fallback_ok /* [L] */, *priority_ok /* [L] */;
    /* context history, per layer a ring of `ring` steps */
    uint64_t *members, *future; /* [L * ring * W] */
    uint8_t *columns;                  /* [L * E * ring]: 1 where the expert is a member of the ring's step */
    uint8_t *need;                     /* [L * ring]: the overlap that makes the step similar */
    int64_t *step_of, *size_of;        /* [L * ring] */
    int64_t *group_steps;              /* [L] */
    int *last_size, *group_prev /* [L * E]: the last finished step's keys, if it can be matched */, *ngroup_prev;
    double *query_scores, *previous_scores; /* [L * E] */
    uint8_t *query_state, *previous_state;  /* [L] */
    int *query_n;                           /* [L]: this step's key count the query scores are for */
    int64_t *query_step;                    /* [L] */
    int64_t *shared;                        /* [(max_keys + 1)^2]: C(have, need) */
    /* residency, as PartitionedPolicy counts it */
    int *resident, *order /* [L * E]: each layer's resident experts in insertion order */;
    int *shift; /* [L]: residency changes a multi-victim choice assumes (0 between calls) */
    uint8_t *is_resident; /* [L * E] */
    /* scratch */
    uint8_t *overlap8, *hits;
    int64_t *overlap, *similar, *rank, *kept_slot;
    int *counts_scratch;
    uint8_t *excluded; /* [L * E] */
    void *blocks[MAX_BLOCKS]; /* every array above but the age tables, for context_free */
    int nblocks, failed;
} Context;

/* Zeroed memory owned by the context (freed by context_free); NULL, remembered, when out of memory. */
static void *take(Context *c, size_t count, size_t size) {
    void *block = calloc(count ? count : 1, size);
    if (!block || c->nblocks == MAX_BLOCKS) {
        free(block);
        c->failed = 1;
        return NULL;
    }
    return c->blocks[c->nblocks++] = block;
}

void context_free(Context *c) {
    if (!c) return;
    for (int i = 0; i < c->nblocks; i++) free(c->blocks[i]);
    free(c->decay_table);
    free(c->recency_table);
    free(c);
}

Context *context_new(int L, int E, double capacity, double context_weight, int horizon, int neighbours,
                     int history_steps, int max_keys, double frequency_weight, double frequency_half_life,
                     double recency_weight, double recency_half_life) {
    if (L < 1 || E < 1 || horizon < 1 || neighbours < 1 || history_steps < 1 || max_keys < 1 ||
        max_keys >= UNMATCHABLE)
        return NULL;
    Context *c = calloc(1, sizeof(Context));
    if (!c) return NULL;
    size_t LE = (size_t)L * E;
    c->L = L; c->E = E; c->W = (E + 63) / 64;
    c->frequency_weight = frequency_weight;
    c->frequency_decay = log(2.0) / frequency_half_life;
    c->recency_weight = recency_weight;
    c->recency_half_life = recency_half_life;
    c->context_weight = context_weight;
    c->horizon = horizon; c->neighbours = neighbours; c->history_steps = history_steps; c->max_keys = max_keys;
    c->ring = history_steps + horizon + 1;
    c->share = capacity / L;
    c->current = -1;
    size_t ring = c->ring, ringL = (size_t)L * ring;
    c->last = take(c, LE, sizeof(int64_t));
    c->frequency = take(c, LE, sizeof(double));
    c->counts = take(c, LE * E, sizeof(double));
    c->sources = take(c, LE, sizeof(double));
    c->transition = take(c, LE, sizeof(double));
    c->fallback = take(c, LE, sizeof(double));
    c->priority = take(c, LE, sizeof(double));
    c->cur = take(c, LE, sizeof(int)); c->ncur = take(c, L, sizeof(int));
    c->prev = take(c, LE, sizeof(int)); c->nprev = take(c, L, sizeof(int));
    c->in_cur = take(c, LE, 1); c->fallback_ok = take(c, L, 1); c->priority_ok = take(c, L, 1);
    c->members = take(c, ringL * c->W, sizeof(uint64_t));
    c->future = take(c, ringL * c->W, sizeof(uint64_t));
    c->columns = take(c, LE * ring, 1);
    c->need = take(c, ringL, 1);
    c->step_of = take(c, ringL, sizeof(int64_t));
    c->size_of = take(c, ringL, sizeof(int64_t));
    c->group_steps = take(c, L, sizeof(int64_t));
    c->last_size = take(c, L, sizeof(int));
    c->group_prev = take(c, LE, sizeof(int)); c->ngroup_prev = take(c, L, sizeof(int));
    c->query_scores = take(c, LE, sizeof(double)); c->previous_scores = take(c, LE, sizeof(double));
    c->query_state = take(c, L, 1); c->previous_state = take(c, L, 1);
    c->query_n = take(c, L, sizeof(int)); c->query_step = take(c, L, sizeof(int64_t));
    c->shared = take(c, (size_t)(max_keys + 1) * (max_keys + 1), sizeof(int64_t));
    c->resident = take(c, L, sizeof(int)); c->order = take(c, LE, sizeof(int)); c->is_resident = take(c, LE, 1);
    c->shift = take(c, L, sizeof(int));
    c->overlap8 = take(c, ring + 8, 1); c->hits = take(c, ring + 8, 1);
    c->overlap = take(c, ring, sizeof(int64_t)); c->similar = take(c, ring, sizeof(int64_t));
    c->rank = take(c, ring, sizeof(int64_t)); c->kept_slot = take(c, ring, sizeof(int64_t));
    c->counts_scratch = take(c, E, sizeof(int));
    c->excluded = take(c, LE, 1);
    if (c->failed) {
        context_free(c);
        return NULL;
    }
    for (size_t i = 0; i < LE; i++) c->last[i] = -1;
    for (size_t i = 0; i < ringL; i++) { c->step_of[i] = -1; c->need[i] = UNMATCHABLE; }
    for (int have = 0; have <= max_keys; have++) /* C(have, need) by Pascal's rule: exact integers */
        for (int need = 0; need <= max_keys; need++) {
            int64_t value;
            if (need == 0) value = 1;
            else if (have == 0) value = 0;
            else value = c->shared[(size_t)(have - 1) * (max_keys + 1) + need - 1] +
                         c->shared[(size_t)(have - 1) * (max_keys + 1) + need];
            c->shared[(size_t)have * (max_keys + 1) + need] = value;
        }
    return c;
}

/* exp(-decay x age) and 0.5^(age / half life): the formulas Python's tables use, read from tables
 * grown on demand; once both have reached 0.0 they stop growing and older ages read 0.0 (the true
 * values underflow too). Where a table cannot grow, the value is computed directly (the same value). */
static void age_weights(Context *c, int64_t age, double *decay, double *recency) {
    if (age >= c->table_len) {
        if (c->table_len > 0 && c->decay_table[c->table_len - 1] == 0.0 && c->recency_table[c->table_len - 1] == 0.0) {
            *decay = *recency = 0.0;
            return;
        }
        int64_t length = c->table_len ? c->table_len : 64;
        while (length <= age) length *= 2;
        double *d = realloc(c->decay_table, length * sizeof(double));
        if (d) c->decay_table = d;
        double *r = d ? realloc(c->recency_table, length * sizeof(double)) : NULL;
        if (r) c->recency_table = r;
        if (!d || !r) {
            *decay = exp(-c->frequency_decay * (double)age);
            *recency = pow(0.5, (double)age / c->recency_half_life);
            return;
        }
        for (int64_t a = c->table_len; a < length; a++) {
            d[a] = exp(-c->frequency_decay * (double)a);
            r[a] = pow(0.5, (double)a / c->recency_half_life);
        }
        c->table_len = length;
    }
    *decay = c->decay_table[age];
    *recency = c->recency_table[age];
}

/* P(target next | source) added for one source, as `MarkovPolicy._sum_sources` adds it. */
static void add_source(Context *c, int layer, int source, double *total) {
    size_t index = (size_t)layer * c->E + source;
    double from = c->sources[index];
    if (from <= 0.0) return; /* never counted as a source */
    const double *row = c->counts + index * c->E;
    for (int target = 0; target < c->E; target++) total[target] += row[target] / from;
}

static void access_key(Context *c, int layer, int expert) {
    size_t index = (size_t)layer * c->E + expert;
    c->current = layer;
    if (c->in_cur[index]) return;
    double decay, recency;
    age_weights(c, c->step - c->last[index], &decay, &recency);
    c->frequency[index] = c->frequency[index] * decay + 1.0;
    c->last[index] = c->step;
    c->in_cur[index] = 1;
    c->cur[(size_t)layer * c->E + c->ncur[layer]++] = expert;
    add_source(c, layer, expert, c->transition + (size_t)layer * c->E);
    c->priority_ok[layer] = 0;
}

/* A key inserted while resident, or evicted while not, changes nothing. */
static void insert_key(Context *c, int layer, int expert) {
    size_t index = (size_t)layer * c->E + expert;
    if (c->is_resident[index]) return;
    c->is_resident[index] = 1;
    c->order[(size_t)layer * c->E + c->resident[layer]++] = expert;
}

static void evict_key(Context *c, int layer, int expert) {
    size_t index = (size_t)layer * c->E + expert;
    if (!c->is_resident[index]) return;
    c->is_resident[index] = 0;
    int *order = c->order + (size_t)layer * c->E;
    int n = c->resident[layer];
    for (int i = 0; i < n; i++)
        if (order[i] == expert) {
            memmove(order + i, order + i + 1, (size_t)(n - i - 1) * sizeof(int));
            c->resident[layer] = n - 1;
            return;
        }
}

/* Applies buffered events; 0, or -1 on a malformed event. */
static int apply(Context *c, const int64_t *events, int64_t count) {
    int64_t keys = (int64_t)c->L * c->E;
    for (int64_t i = 0; i < count; i++) {
        int64_t kind = events[i] / keys, code = events[i] % keys;
        if (events[i] < 0 || kind > EV_EVICT) return -1;
        int layer = (int)(code / c->E), expert = (int)(code % c->E);
        if (kind == EV_ACCESS) {
            access_key(c, layer, expert);
        } else if (kind == EV_INSERT) {
            insert_key(c, layer, expert);
        } else {
            evict_key(c, layer, expert);
        }
    }
    return 0;
}

static int needed_overlap(int size) {
    int need = (2 * size + 2) / 3;
    return need > 1 ? need : 1;
}

/* `_GroupHistory.scores`: per expert, the share of the most similar matchable past steps whose
 * next `horizon` steps used it; SCORES_NONE when no past step is similar. */
static int history_scores(Context *c, int layer, const int *keys, int nkeys, double *out) {
    int W = c->W, ring = c->ring;
    const uint8_t *need = c->need + (size_t)layer * ring;
    const int64_t *step_of = c->step_of + (size_t)layer * ring;
    uint8_t *overlap = c->overlap8, *hits = c->hits;
    memset(overlap, 0, ring);
    for (int i = 0; i < nkeys; i++) { /* each past step's shared keys: byte columns added (vectorised) */
        const uint8_t *column = c->columns + ((size_t)layer * c->E + keys[i]) * ring;
        for (int slot = 0; slot < ring; slot++) overlap[slot] += column[slot];
    }
    for (int slot = 0; slot < ring; slot++) hits[slot] = (need[slot] != UNMATCHABLE) & (overlap[slot] >= need[slot]);
    int64_t nsimilar = 0;
    for (int slot = 0; slot < ring; slot += 8) { /* hits read eight at a time: most are 0 */
        uint64_t word;
        memcpy(&word, hits + slot, 8); /* hits has 8 spare zero bytes past the ring */
        for (; word; word &= word - 1) {
            int at = slot + __builtin_ctzll(word) / 8;
            if (at < ring) {
                c->overlap[nsimilar] = overlap[at];
                c->similar[nsimilar++] = at;
            }
        }
    }
    if (nsimilar == 0) return SCORES_NONE;
    if (nsimilar > c->neighbours) { /* keep the `neighbours` highest ranks (all distinct: steps differ) */
        int k = c->neighbours;
        int kept = 0; /* rank[0..kept) ascending, kept_slot beside it */
        for (int64_t i = 0; i < nsimilar; i++) {
            int64_t slot = c->similar[i];
            int64_t r = (c->shared[(size_t)c->overlap[i] * (c->max_keys + 1) + need[slot]] << 40) | step_of[slot];
            int j;
            if (kept < k) {
                for (j = kept++; j > 0 && c->rank[j - 1] > r; j--) {
                    c->rank[j] = c->rank[j - 1];
                    c->kept_slot[j] = c->kept_slot[j - 1];
                }
            } else if (r > c->rank[0]) {
                for (j = 0; j + 1 < k && c->rank[j + 1] < r; j++) {
                    c->rank[j] = c->rank[j + 1];
                    c->kept_slot[j] = c->kept_slot[j + 1];
                }
            } else {
                continue;
            }
            c->rank[j] = r;
            c->kept_slot[j] = slot;
        }
        for (int i = 0; i < k; i++) c->similar[i] = c->kept_slot[i];
        nsimilar = k;
    }
    const uint64_t *future = c->future + (size_t)layer * ring * W;
    memset(c->counts_scratch, 0, c->E * sizeof(int));
    for (int64_t i = 0; i < nsimilar; i++) {
        const uint64_t *row = future + (size_t)c->similar[i] * W;
        for (int w = 0; w < W; w++)
            for (uint64_t bits = row[w]; bits; bits &= bits - 1) c->counts_scratch[w * 64 + __builtin_ctzll(bits)]++;
    }
    double inverse = 1.0 / (double)nsimilar;
    for (int e = 0; e < c->E; e++) out[e] = (double)c->counts_scratch[e] * inverse;
    return SCORES_FOUND;
}

/* `ContextPolicy._scores`: this step's keys when enough are known, else the last finished step's. */
static const double *context_scores(Context *c, int layer) {
    size_t base = (size_t)layer * c->E;
    int n = c->ncur[layer];
    if (n > 0 && needed_overlap(c->last_size[layer]) <= n && n <= c->max_keys) {
        if (c->query_state[layer] == SCORES_UNKNOWN || c->query_n[layer] != n || c->query_step[layer] != c->step) {
            c->query_state[layer] = (uint8_t)history_scores(c, layer, c->cur + base, n, c->query_scores + base);
            c->query_n[layer] = n;
            c->query_step[layer] = c->step;
        }
        if (c->query_state[layer] == SCORES_FOUND) return c->query_scores + base;
    }
    if (c->previous_state[layer] == SCORES_UNKNOWN)
        c->previous_state[layer] = c->ngroup_prev[layer]
            ? (uint8_t)history_scores(c, layer, c->group_prev + base, c->ngroup_prev[layer], c->previous_scores + base)
            : SCORES_NONE;
    return c->previous_state[layer] == SCORES_FOUND ? c->previous_scores + base : NULL;
}

/* Every expert's priority in `layer` (kept until its next first use in a step, or the step's end). */
static const double *priorities(Context *c, int layer) {
    size_t base = (size_t)layer * c->E;
    double *out = c->priority + base;
    if (c->priority_ok[layer]) return out;
    const double *transition = c->transition + base;
    if (c->ncur[layer] == 0) {
        if (!c->fallback_ok[layer]) {
            double *fallback = c->fallback + base;
            memset(fallback, 0, c->E * sizeof(double));
            for (int i = 0; i < c->nprev[layer]; i++) add_source(c, layer, c->prev[base + i], fallback);
            c->fallback_ok[layer] = 1;
        }
        transition = c->fallback + base;
    }
    for (int e = 0; e < c->E; e++) {
        int64_t last = c->last[base + e];
        if (last < 0) {
            out[e] = 0.0;
            continue;
        }
        double decay, recency;
        age_weights(c, c->step - last, &decay, &recency);
        double score = c->frequency_weight * c->frequency[base + e] * decay;
        score += c->recency_weight * recency;
        score += transition[e];
        out[e] = score;
    }
    const double *context = context_scores(c, layer);
    if (context)
        for (int e = 0; e < c->E; e++) out[e] += c->context_weight * context[e];
    c->priority_ok[layer] = 1;
    return out;
}

/* The resident, not excluded expert of `layer` with the lowest priority (the first in insertion
 * order among equals), or -1. */
static int layer_victim(Context *c, int layer) {
    size_t base = (size_t)layer * c->E;
    const int *order = c->order + base;
    int best = -1;
    double lowest = 0.0;
    const double *scores = NULL;
    for (int i = 0; i < c->resident[layer]; i++) {
        int expert = order[i];
        if (c->excluded[base + expert]) continue;
        if (!scores) scores = priorities(c, layer);
        if (best < 0 || scores[expert] < lowest) {
            best = expert;
            lowest = scores[expert];
        }
    }
    return best;
}

/* The resident, not excluded key of the layer `PartitionedPolicy._victim_by_group` would evict from:
 * layers by residency (highest first), then the current layer, the one before it, ...; -1: none. */
static int64_t search(Context *c) {
    int level = 1 << 30;
    for (;;) { /* the next lower residency level held by some layer */
        int next = 0;
        for (int layer = 0; layer < c->L; layer++) {
            int count = c->resident[layer] + c->shift[layer];
            if (count < level && count > next) next = count;
        }
        if (next == 0) return -1;
        level = next;
        for (int back = 0; back < c->L; back++) {
            int layer = ((c->current - back) % c->L + c->L) % c->L;
            if (c->resident[layer] + c->shift[layer] != level) continue;
            int expert = layer_victim(c, layer);
            if (expert >= 0) return (int64_t)layer * c->E + expert;
        }
    }
}

/* `count` victims for the `incoming` keys (codes) that will take their slots, none of them `excluded`:
 * the i-th as the policy would pick it once the first i victims are evicted and the first i incoming
 * keys inserted (nothing is changed: the caller's evict and insert notes do that). Returns how many
 * were found (fewer: no resident key is left), -2 before any access (the caller groups its candidates
 * instead), -3 on a malformed event or code. `incoming` may be NULL when `count` is 1. */
int64_t context_victims(Context *c, const int64_t *events, int64_t nevents, const int64_t *excluded,
                        int64_t nexcluded, const int64_t *incoming, int64_t count, int64_t *out) {
    if (apply(c, events, nevents)) return -3;
    if (c->current < 0) return -2;
    int64_t keys = (int64_t)c->L * c->E;
    for (int64_t i = 0; i + 1 < count; i++)
        if (incoming[i] < 0 || incoming[i] >= keys) return -3;
    for (int64_t i = 0; i < nexcluded; i++)
        if (excluded[i] >= 0 && excluded[i] < keys) c->excluded[excluded[i]] = 1;
    int64_t found = 0;
    for (; found < count; found++) {
        int64_t code = search(c);
        if (code < 0) break;
        out[found] = code;
        c->excluded[code] = 1;
        if (found + 1 < count) { /* the victim leaves, the incoming key arrives (protected: never a victim) */
            c->shift[code / c->E]--;
            c->shift[incoming[found] / c->E]++;
        }
    }
    for (int64_t i = 0; i < found; i++) {
        c->excluded[out[i]] = 0;
        if (i + 1 < count) {
            c->shift[out[i] / c->E]++;
            c->shift[incoming[i] / c->E]--;
        }
    }
    for (int64_t i = 0; i < nexcluded; i++)
        if (excluded[i] >= 0 && excluded[i] < keys) c->excluded[excluded[i]] = 0;
    return found;
}

/* Victim among an explicit candidate list, by `PartitionedPolicy.victim`'s full pass: the layer with the
 * most residency over its share (then the one next needed furthest ahead; the first seen among equals),
 * and in it the lowest priority (the first in list order among equals). -3: a malformed event or key. */
int64_t context_victim_among(Context *c, const int64_t *events, int64_t nevents, const int64_t *codes, int64_t ncodes) {
    if (apply(c, events, nevents)) return -3;
    int64_t keys = (int64_t)c->L * c->E;
    int chosen = -1, chosen_distance = 0;
    double chosen_over = 0.0;
    for (int64_t i = 0; i < ncodes; i++) {
        if (codes[i] < 0 || codes[i] >= keys) return -3;
        int layer = (int)(codes[i] / c->E);
        double over = (double)c->resident[layer] - c->share;
        int distance = c->current < 0 ? 0 : ((layer - c->current - 1) % c->L + c->L) % c->L + 1;
        if (chosen < 0 || over > chosen_over || (over == chosen_over && distance > chosen_distance)) {
            chosen = layer;
            chosen_over = over;
            chosen_distance = distance;
        }
    }
    if (chosen < 0) return -1;
    const double *scores = priorities(c, chosen);
    int64_t best = -1;
    double lowest = 0.0;
    for (int64_t i = 0; i < ncodes; i++) {
        if (codes[i] / c->E != chosen) continue;
        double score = scores[codes[i] % c->E];
        if (best < 0 || score < lowest) {
            best = codes[i];
            lowest = score;
        }
    }
    return best;
}

/* `_GroupHistory.finish_step` for one layer. */
static void finish_history(Context *c, int layer) {
    int n = c->ncur[layer];
    if (n == 0) return;
    int W = c->W, ring = c->ring;
    size_t base = (size_t)layer * c->E, ring_base = (size_t)layer * ring;
    const int *keys = c->cur + base;
    int64_t step = c->group_steps[layer]++;
    int slot = (int)(step % ring);
    uint64_t *members = c->members + ring_base * W;
    uint64_t *column = members + (size_t)slot * W;
    uint8_t *columns = c->columns + base * ring;
    for (int w = 0; w < W; w++) /* the step this slot held leaves the byte columns */
        for (uint64_t bits = column[w]; bits; bits &= bits - 1)
            columns[(size_t)(w * 64 + __builtin_ctzll(bits)) * ring + slot] = 0;
    memset(column, 0, W * sizeof(uint64_t));
    for (int i = 0; i < n; i++) {
        column[keys[i] >> 6] |= 1ULL << (keys[i] & 63);
        columns[(size_t)keys[i] * ring + slot] = 1;
    }
    c->step_of[ring_base + slot] = step;
    c->size_of[ring_base + slot] = n;
    c->need[ring_base + slot] = UNMATCHABLE;
    c->last_size[layer] = n;
    int64_t source = step - c->horizon;
    if (source >= 0) {
        int source_slot = (int)(source % ring);
        int64_t size = c->size_of[ring_base + source_slot];
        if (size <= c->max_keys) {
            uint64_t *future = c->future + (ring_base + source_slot) * W;
            memset(future, 0, W * sizeof(uint64_t));
            for (int offset = 1; offset <= c->horizon; offset++) {
                const uint64_t *later = members + (size_t)((source + offset) % ring) * W;
                for (int w = 0; w < W; w++) future[w] |= later[w];
            }
            c->need[ring_base + source_slot] = needed_overlap((int)size);
        }
    }
    int64_t forgotten = step - c->horizon - c->history_steps;
    if (forgotten >= 0) c->need[ring_base + forgotten % ring] = UNMATCHABLE;
    if (n <= c->max_keys) memcpy(c->group_prev + base, keys, n * sizeof(int));
    c->ngroup_prev[layer] = n <= c->max_keys ? n : 0;
    c->previous_state[layer] = SCORES_UNKNOWN;
    c->query_state[layer] = SCORES_UNKNOWN;
}

/* The end of an engine step: buffered events, then every layer's history and Markov step. */
int context_step(Context *c, const int64_t *events, int64_t nevents) {
    if (apply(c, events, nevents)) return -3;
    for (int layer = 0; layer < c->L; layer++) {
        finish_history(c, layer);
        size_t base = (size_t)layer * c->E;
        int n = c->ncur[layer];
        if (n) {
            int np = c->nprev[layer];
            for (int i = 0; i < np; i++) {
                int source = c->prev[base + i];
                double *row = c->counts + (base + source) * c->E;
                for (int j = 0; j < n; j++) row[c->cur[base + j]] += 1.0;
                c->sources[base + source] += 1.0;
            }
            memcpy(c->prev + base, c->cur + base, n * sizeof(int));
            c->nprev[layer] = n;
            for (int j = 0; j < n; j++) c->in_cur[base + c->cur[base + j]] = 0;
            c->ncur[layer] = 0;
            memset(c->transition + base, 0, c->E * sizeof(double));
            c->fallback_ok[layer] = 0;
        }
        c->priority_ok[layer] = 0;
    }
    c->step++;
    return 0;
}
