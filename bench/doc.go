// Package bench holds servicepath's benchmarks (`make bench`).
package bench
