package strictyaml

import (
	"math"
	"math/big"
	"reflect"
	"strings"
)

// parseInteger reads a decimal integer, or a hexadecimal, octal or binary
// one with an explicit 0x, 0o or 0b prefix. Unlike Go's base 0, a leading
// zero does not mean octal: "010" is ten, as a person reading it expects.
// The result is a big.Int so that range errors can quote any value.
func parseInteger(s string) (*big.Int, bool) {
	digits, neg := s, false
	if rest, ok := strings.CutPrefix(digits, "-"); ok {
		digits, neg = rest, true
	} else {
		digits = strings.TrimPrefix(digits, "+")
	}
	base := 10
	if len(digits) > 2 && digits[0] == '0' {
		switch digits[1] {
		case 'x', 'X':
			base = 16
		case 'o', 'O':
			base = 8
		case 'b', 'B':
			base = 2
		}
		if base != 10 {
			digits = digits[2:]
		}
	}
	// big.Int.SetString would accept a second sign; the number has had
	// its one already.
	if digits == "" || digits[0] == '+' || digits[0] == '-' {
		return nil, false
	}
	x, ok := new(big.Int).SetString(digits, base)
	if !ok {
		return nil, false
	}
	if neg {
		x.Neg(x)
	}
	return x, true
}

// intRange is the smallest and largest value v's integer kind can hold.
func intRange(v reflect.Value) (lo, hi *big.Int) {
	bits := uint(v.Type().Bits())
	if v.CanInt() {
		hi = new(big.Int).Lsh(big.NewInt(1), bits-1)
		lo = new(big.Int).Neg(hi)
		return lo, hi.Sub(hi, big.NewInt(1))
	}
	hi = new(big.Int).SetUint64(math.MaxUint64 >> (64 - bits))
	return big.NewInt(0), hi
}
