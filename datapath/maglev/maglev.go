// Package maglev builds Maglev consistent-hashing lookup tables (Eisenbud
// et al., "Maglev: A Fast and Reliable Software Network Load Balancer",
// NSDI 2016): a flow hash indexes a table of backends, each backend owns
// close to an equal share of slots, and a change of backends moves little
// more than the share that must move, so most flows of a north-south
// service keep their backend even on a node that never saw them before.
package maglev

import (
	"errors"
	"fmt"
	"hash/fnv"
	"math/big"
)

// Table sizes offered: primes well above any backend count a service has.
const (
	Small = 16381
	Large = 65521
)

// hash64 is FNV-1a: stable across processes and restarts, so every node
// and every agent run builds the same table from the same backends.
func hash64(salt byte, s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte{salt})
	h.Write([]byte(s))
	return h.Sum64()
}

// Build fills a table of m slots (m prime) with indexes into backends,
// which name each backend stably (e.g. "10.0.0.1:8080"). Each backend
// walks its own permutation of the slots, given by an offset and a skip
// hashed from its name, and takes turns claiming the next free slot.
func Build(backends []string, m int) ([]int, error) {
	if m < 2 || !big.NewInt(int64(m)).ProbablyPrime(20) {
		return nil, fmt.Errorf("maglev table size %d is not a prime", m)
	}
	if len(backends) == 0 {
		return nil, errors.New("maglev table needs at least one backend")
	}
	if len(backends) > m {
		return nil, fmt.Errorf("%d backends do not fit a maglev table of %d slots", len(backends), m)
	}
	seen := make(map[string]bool, len(backends))
	offset := make([]uint64, len(backends))
	skip := make([]uint64, len(backends))
	for i, b := range backends {
		if seen[b] {
			return nil, fmt.Errorf("backend %q listed twice", b)
		}
		seen[b] = true
		offset[i] = hash64(0, b) % uint64(m)
		skip[i] = hash64(1, b)%uint64(m-1) + 1
	}

	table := make([]int, m)
	for i := range table {
		table[i] = -1
	}
	next := make([]uint64, len(backends))
	for filled := 0; ; {
		for i := range backends {
			// Slot of backend i's permutation at position next[i];
			// skip and m coprime make it visit every slot once.
			slot := (offset[i] + next[i]*skip[i]) % uint64(m)
			for table[slot] >= 0 {
				next[i]++
				slot = (offset[i] + next[i]*skip[i]) % uint64(m)
			}
			table[slot] = i
			next[i]++
			if filled++; filled == m {
				return table, nil
			}
		}
	}
}
