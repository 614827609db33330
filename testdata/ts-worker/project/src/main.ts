// The fixture's entry module: one request compiles it and greet.ts into
// out/main.js, out/greet.js and their .d.ts files.
import { greet } from "./greet";

export const message: string = greet({ who: "worker", times: 1 });
