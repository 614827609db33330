// The fixture's library module: main.ts imports it, so a request checks
// and emits an import across files.
export interface Greeting {
  readonly who: string;
  readonly times: number;
}

export function greet(g: Greeting): string {
  return `hello, ${g.who}`.repeat(g.times);
}
